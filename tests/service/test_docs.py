"""The API documentation works offline and tells the truth: /docs and /redoc load their assets from the
server itself (no CDN: the machines that run us have no internet), headless Chromium renders every
endpoint, each route declares the errors it can return and is tagged and described, responses are typed,
and the request examples the docs offer succeed against a server of the default model's name."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from model.registry import DEFAULT_MODEL
from service.server.app import build_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def url(tiny, serve, own_engine):
    named = own_engine(tiny)  # the same weights, served under the default model's name
    named.name = DEFAULT_MODEL
    with serve(build_app(named)) as url:
        yield url


def test_docs_pages_load_their_assets_from_the_server(url):
    """/docs and /redoc reference only this server's own paths, and those assets are served."""
    for page in ("/docs", "/redoc"):
        html = httpx.get(url + page).text
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', html) + re.findall(r"url: '([^']+)'", html)
        assert assets and all(a.startswith("/") for a in assets), (page, assets)
        for a in assets:
            assert httpx.get(url + a).status_code == 200, a


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run installs it)")
def test_chromium_renders_every_endpoint(url, tmp_path):
    """Headless Chromium, with no network but loopback, renders Swagger UI with every operation, the tags
    and the Authorize button of the bearer scheme (the page was blank offline: its assets came from a CDN)."""
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            f"{url}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    spec = httpx.get(f"{url}/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method in ops:
            assert re.search(rf'data-path="{re.escape(path)}"', dom) or path in dom, (method, path)
    for tag in ("Answers and summaries", "OpenAI-compatible", "Files", "Batches", "Task jobs", "Health"):
        assert tag in dom, tag
    assert "authorize" in dom.lower()


def test_each_route_declares_its_own_errors_and_typed_responses(url):
    """Errors per route (a task has no 404, a model lookup no 429), no 422 but an upload route's own
    (validation is 400; an unreadable file is 422), the OpenAI responses typed instead of `string`, and
    every operation tagged and described."""
    spec = httpx.get(f"{url}/openapi.json").json()
    ops = {(m, p): op for p, path in spec["paths"].items() for m, op in path.items()}
    assert ops[("post", "/v1/summarize")]["responses"]["422"]["description"].startswith("A file that cannot")
    assert "404" not in ops[("post", "/v1/answer")]["responses"]
    assert "429" not in ops[("get", "/v1/models/{model}")]["responses"]
    for (_, path), op in ops.items():
        own = path in ("/v1/summarize", "/v1/answer")  # an unreadable upload
        assert ("422" not in op["responses"] or own) and op["tags"] and op.get("description"), op.get("operationId")
    typed = {
        ("post", "/v1/completions"): "Completion",
        ("post", "/v1/chat/completions"): "ChatCompletion",
        ("get", "/v1/models"): "ModelList",
    }
    for key, name in typed.items():
        schema = ops[key]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{name}"}, (key, schema)


def test_the_documented_examples_succeed(url):
    """Each request example the docs offer ("Try it out") gets 200 from a server of the default model's
    name (the generated example `"model": "string"` got 404)."""
    spec = httpx.get(f"{url}/openapi.json").json()
    tried = []
    for path, ops in spec["paths"].items():
        body = ops.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body is None:
            continue
        ref = body["schema"]["$ref"].split("/")[-1]
        for example in spec["components"]["schemas"][ref].get("examples", []):  # a batch needs a file first
            r = httpx.post(url + path, json=example, timeout=120)
            assert r.status_code == 200, (path, r.text)
            tried.append(path)
    assert set(tried) == {"/v1/answer", "/v1/summarize", "/v1/completions", "/v1/chat/completions"}
