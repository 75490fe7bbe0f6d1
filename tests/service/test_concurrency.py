"""Continuous batching under concurrent clients: independent results, backpressure, cancellation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from service.server.app import build_app


def completion(client, prompt: str, seed: int, max_tokens: int = 24) -> dict:
    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.9, "seed": seed}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_concurrent_requests_equal_each_alone(tiny):
    """Guards slot bookkeeping and per-sequence sampling state: batching must not mix requests."""
    prompts = [(f"request number {i} " * (i % 4 + 1), i) for i in range(12)]
    with TestClient(build_app(tiny, slots=4)) as client:
        alone = [completion(client, p, seed) for p, seed in prompts]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda a: completion(client, *a), prompts))
    assert together == alone


def test_overload_gets_429_with_retry_after(tiny):
    """A full queue gets 429 with Retry-After and code overloaded, while the admitted requests still succeed."""
    body = {"model": "tiny-random", "prompt": "x", "max_tokens": 400, "temperature": 0}
    with TestClient(build_app(tiny, slots=1, max_waiting=1)) as client:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "overloaded"


def test_client_that_disconnects_frees_its_slot(tiny, serve, submitted):
    """A real server (the test client buffers whole responses): read one event, hang up."""
    import httpx

    body = {"model": "tiny-random", "prompt": "go", "max_tokens": 1000, "temperature": 0, "stream": True}
    app = build_app(tiny, slots=2)
    with serve(app) as url:
        scheduler, seen = app.state.engine.scheduler, submitted(app)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            assert len(scheduler.running) == 1
        assert seen.ended(), "the slot was not freed"
        assert len(scheduler.free) == 2


def test_deadline_gives_504_and_frees_the_slot(tiny, submitted):
    """--request-timeout gives 504 and the timed-out sequence leaves its cache slot."""
    body = {"model": "tiny-random", "prompt": "go", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with TestClient(build_app(tiny, slots=2, request_timeout=0.3)) as client:
        seen = submitted(client.app)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert seen.ended() and not client.app.state.engine.scheduler.running


def test_non_streaming_client_that_disconnects_is_cancelled(tiny, serve, submitted):
    """A plain request whose client hangs up is aborted: its generation must not run on for nobody."""
    import httpx

    body = {"model": "tiny-random", "prompt": "go", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    app = build_app(tiny, slots=2)
    with serve(app) as url:
        seen = submitted(app)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)  # hangs up after 0.5 s
        seen.reach(1)
        assert seen.ended(), "generation went on for a client that left"
        assert seen.seqs[0].finish_reason == "cancelled"


def test_abort_ends_only_that_requests_sequences(tiny):
    """`Engine.abort(request_id)` is the one way to cancel (it replaced a `cancelled()` callback polled
    every step): it must end every sequence of that request, queued or running, and no other."""
    from service.engine.core import Engine
    from service.engine.sampling_params import SamplingParams

    engine = Engine(tiny.engine.model, max_waiting=8).start(slots=1)
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        gone = tiny.engine.sequences([[1, 2], [3]], [params] * 2, request="gone")  # one runs, one waits
        kept = tiny.engine.sequences([[4]], [SamplingParams(max_tokens=5, ignore_eos=True)], request="kept")
        engine.submit(gone + kept)
        engine.abort("gone")
        assert all(s.done.wait(30) for s in gone + kept)
        assert [s.finish_reason for s in gone] == ["cancelled", "cancelled"]
        assert kept[0].finish_reason == "length" and len(kept[0].output) == 5
        engine.abort("kept")  # an ended request: nothing to do, nothing breaks
        assert engine.run(tiny.engine.sequences([[5]], [SamplingParams(max_tokens=2)]))[0].token_ids
    finally:
        engine.stop()
