"""What front-ends wire in beside generation: several API keys (flags, a key file, the environment), CORS
for browser front-ends (none by default, preflights answered without a key), and vLLM's /tokenize and
/detokenize."""

from __future__ import annotations

import argparse

from fastapi.testclient import TestClient

from service.cli.serving import api_keys
from service.server.app import build_app

M = "tiny-random"


def test_any_of_several_keys_opens_the_api_and_the_rest_do_not(tiny):
    """Two keys: either one is let in on /v1 and /tokenize; a wrong one or none is a 401; probes stay open."""
    with TestClient(build_app(tiny, api_keys=["k1", "k2"])) as c:
        for key in ("k1", "k2"):
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        assert c.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/ready").status_code == 200


def test_keys_come_from_flags_a_file_or_the_environment(tmp_path, monkeypatch):
    """`--api-key` repeated and `--api-key-file` add up (blank lines and comments skipped); NLG_API_KEY
    (comma-separated) counts only without either."""
    keys = tmp_path / "keys"
    keys.write_text("alpha  # the web front-end\n\n# retired: gamma\nbeta\n")
    args = argparse.Namespace(api_key=["one"], api_key_file=str(keys))
    monkeypatch.setenv("NLG_API_KEY", "env1, env2")
    assert api_keys(args) == ["one", "alpha", "beta"]
    assert api_keys(argparse.Namespace(api_key=None, api_key_file=None)) == ["env1", "env2"]
    monkeypatch.delenv("NLG_API_KEY")
    assert api_keys(argparse.Namespace(api_key=None, api_key_file=None)) == []


def test_cors_only_for_the_allowed_origins(tiny):
    """No CORS headers by default; with an allowed origin its preflight is answered (before the key check)
    and its requests carry Access-Control-Allow-Origin; another origin gets none."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with TestClient(build_app(tiny)) as c:
        assert "access-control-allow-origin" not in c.options("/v1/chat/completions", headers=preflight).headers
    with TestClient(build_app(tiny, api_keys=["k"], allowed_origins=["https://app.example"])) as c:
        r = c.options("/v1/chat/completions", headers=preflight | {"Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


def test_tokenize_and_detokenize_as_vllm_shapes_them(tiny):
    """/tokenize counts a prompt's tokens (and a conversation's, through the chat template) with the context
    beside it; /detokenize gives the text back; bad input is a 400."""
    with TestClient(build_app(tiny)) as c:
        r = c.post("/tokenize", json={"model": M, "prompt": "Hello there", "return_token_strs": True}).json()
        assert r["tokens"] == tiny.tokenizer.encode("Hello there") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == tiny.engine.context and "".join(r["token_strs"]) == "Hello there"
        chat = [{"role": "user", "content": "Hi"}]
        r2 = c.post("/tokenize", json={"messages": chat}).json()
        assert r2["tokens"] == tiny.tokenizer.chat(chat)
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello there"}
        assert c.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
        assert c.post("/tokenize", json={"prompt": "a", "messages": chat}).status_code == 400
        assert c.post("/tokenize", json={"model": "gpt-4", "prompt": "a"}).status_code == 404
