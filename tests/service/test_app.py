"""The HTTP service on tiny-random: round trips, OpenAPI, and one error shape for bad input."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from service.server.app import MAX_BODY_BYTES, build_app
from service.tasks.text import first_sentence


@pytest.fixture(scope="module")
def client(tiny, own_engine):
    with TestClient(build_app(own_engine(tiny))) as c:  # `with`: the lifespan starts the engine thread
        yield c


def assert_error(r, status: int, needle: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert needle in body["error"]["message"]


def test_health_and_docs(client):
    """Liveness, the docs page and the OpenAPI schema with our task routes are served."""
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-random"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/answer", "/v1/summarize", "/health"} <= set(paths)


def test_answer_round_trip(client):
    """The answer response has exactly its documented fields, usage adds up, and the default (greedy) is
    deterministic."""
    r = client.post(
        "/v1/answer",
        json={
            "question": "Who is Jason Mraz engaged to?",
            "passages": ["Jason Mraz and Tristan Prettyman got engaged."],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"answer", "passage_index", "answered", "span", "citation", "scores", "model", "usage"}
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    again = client.post(
        "/v1/answer",
        json={
            "question": "Who is Jason Mraz engaged to?",
            "passages": ["Jason Mraz and Tristan Prettyman got engaged."],
        },
    )
    assert again.json() == body  # greedy by default


def test_summarize_round_trip(client):
    """The summarize response has exactly its documented fields."""
    r = client.post("/v1/summarize", json={"document": "The council approved the new park. " * 4, "length": "short"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"summary", "sentences", "scores", "citations", "model", "usage"}


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/v1/answer", {"question": "   "}, "question"),
        ("/v1/answer", {}, "question"),
        ("/v1/answer", {"question": "q", "passages": [""]}, "passages"),
        ("/v1/answer", {"question": "q", "max_tokens": 0}, "max_tokens"),
        ("/v1/summarize", {"document": "d", "length": "huge"}, "length"),
        ("/v1/summarize", {"document": "x" * 200_001}, "document"),
    ],
)
def test_malformed_requests_get_400(client, path, body, needle):
    """Bodies FastAPI cannot validate get 400 (as OpenAI answers) in our one error shape, naming the field."""
    r = client.post(path, json=body)
    assert_error(r, 400, needle)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_input_beyond_the_context_gets_400_naming_the_numbers(client):
    """A question longer than the context is 400 context_length_exceeded with the numbers, not a 500 from the
    cache."""
    r = client.post("/v1/answer", json={"question": "why " * 600})
    assert_error(r, 400, "maximum context length is 2048 tokens")
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_oversized_body_gets_413(client):
    """A body over the limit is refused with 413 before it is parsed."""
    r = client.post("/v1/summarize", content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert_error(r, 413, "exceeds the limit")


def test_ready_runs_a_real_step(client):
    """/ready says ready only after a real forward through the model."""
    assert client.get("/ready").json() == {"status": "ready", "model": "tiny-random"}


def test_engine_failure_gives_503_from_then_on_and_is_fatal(tiny, monkeypatch):
    """A dead rank surfaces as an exception inside the engine: report 503, then exit via on_fatal."""
    import threading

    fatal = threading.Event()

    def broken(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    with TestClient(build_app(tiny, on_fatal=fatal.set)) as client:
        monkeypatch.setattr(tiny.engine.runner, "model", broken)
        assert_error(client.get("/ready"), 503, "Connection closed by peer")
        monkeypatch.undo()
        assert_error(client.post("/v1/answer", json={"question": "still there?"}), 503, "engine failed")
        assert fatal.wait(5)


def test_api_key_guards_v1_but_not_health(tiny):
    """With --api-key every /v1 route needs the bearer key; probes stay open for orchestrators."""
    with TestClient(build_app(tiny, api_keys=["s3cret"])) as c:
        check_key(c)


def check_key(c):
    body = {"question": "Who?"}
    assert_error(c.post("/v1/answer", json=body), 401, "API key")
    assert_error(c.post("/v1/answer", json=body, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    assert c.post("/v1/answer", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/models").status_code == 401
    assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_metrics_count_requests_and_tokens(tiny):
    """Prometheus metrics under vLLM's names and model_name label (a vLLM dashboard reads them), each HTTP
    request counted once by route and status, the process's memory."""
    with TestClient(build_app(tiny)) as c:
        check_metrics(c)


def test_metrics_show_the_prefix_cache_and_blocks(tiny):
    """Two questions about one passage: the second finds the system prompt, instruction and passage in the
    prefix cache (the tokens counted as hits), and the blocks held, free and preempted are exported."""
    import re

    passage = "The river rises in the hills and runs two hundred miles to the sea past three towns. " * 3
    with TestClient(build_app(tiny)) as c:
        for question in ("How long is the river?", "Where does it rise?"):
            assert (
                c.post("/v1/answer", json={"question": question, "passages": [passage], "max_tokens": 4}).status_code
                == 200
            )
        text = c.get("/metrics").text

    def value(name: str) -> float:
        return float(re.search(rf'^{name}{{model_name="tiny-random"}} (\S+)$', text, re.M).group(1))

    assert value("vllm:prefix_cache_hits_total") >= 16 * (len(passage) // 16)  # bytes are tokens here
    assert value("vllm:prefix_cache_queries_total") > value("vllm:prefix_cache_hits_total")
    assert value("vllm:num_preemptions_total") == 0 and value("vllm:kv_cache_usage_perc") == 0
    assert value("nlg_kv_cache_blocks_free") > 0


def check_metrics(c):
    r = c.post("/v1/answer", json={"question": "Who?", "max_tokens": 5}).json()
    c.post("/v1/completions", json={"model": "tiny-random", "prompt": "hi", "temperature": 9})
    text = c.get("/metrics").text
    label = '{model_name="tiny-random"}'
    assert f"vllm:generation_tokens_total{label} {float(r['usage']['completion_tokens'])}" in text
    assert f"vllm:time_to_first_token_seconds_count{label} 1.0" in text
    assert f"vllm:e2e_request_latency_seconds_count{label} 1.0" in text  # the 400 is not a success
    assert f"vllm:num_requests_running{label} 0.0" in text and f"vllm:kv_cache_usage_perc{label} 0.0" in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="tiny-random"} 1.0' in text
    assert f"vllm:request_generation_tokens_count{label} 1.0" in text
    assert 'nlg_http_requests_total{model_name="tiny-random",route="/v1/answer",status="200"} 1.0' in text
    assert 'nlg_http_requests_total{model_name="tiny-random",route="/v1/completions",status="400"} 1.0' in text
    assert "process_resident_memory_bytes" in text
    c.get("/ready")  # probes stay out of request metrics
    assert f"vllm:e2e_request_latency_seconds_count{label} 1.0" in c.get("/metrics").text


def test_ready_is_503_while_the_model_loads(tiny):
    """While the model loads, /health answers, /ready and /v1 are 503 (not connection refused), then the app takes
    over."""
    import threading

    from service.server.loading import Loading

    loaded = threading.Event()

    def load():
        loaded.wait(10)
        return build_app(tiny)

    with TestClient(Loading(load)) as c:
        assert c.get("/health").json() == {"status": "loading"}
        assert_error(c.get("/ready"), 503, "loading")
        assert_error(c.post("/v1/answer", json={"question": "Who?"}), 503, "loading")
        loaded.set()
        deadline = time.time() + 10
        while c.get("/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert c.post("/v1/answer", json={"question": "Who?", "max_tokens": 4}).status_code == 200


def test_streamed_answer_ends_with_the_full_response(client):
    """A streamed answer's last event is the same object as the non-streamed response, and its deltas are the raw
    text it was cut from, or replaced by the sentence saying the passage does not answer (the random model's
    words are in no passage)."""
    body = {"question": "Who is Jason Mraz engaged to?", "passages": ["Jason Mraz and Tristan Prettyman."]}
    whole = client.post("/v1/answer", json=body).json()
    with client.stream("POST", "/v1/answer", json=body | {"stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == whole
    raw = "".join(json.loads(e)["delta"] for e in events[:-2])
    if whole["answered"]:
        assert first_sentence(raw) == whole["answer"]  # the pieces are the raw text the answer is cut from
    else:
        assert raw and whole["answer"] == "The passage does not answer this question."


def test_several_documents_or_one(client):
    """summarize takes one document or several, never both or neither (400)."""
    r = client.post("/v1/summarize", json={"documents": ["First report.", "Second report."], "length": "short"})
    assert r.status_code == 200, r.text
    assert_error(client.post("/v1/summarize", json={"document": "a", "documents": ["b"]}), 400, "either")
    assert_error(client.post("/v1/summarize", json={}), 400, "either")


def test_per_request_evaluation(client):
    """evaluate in a request returns the hook's scores (ROUGE equal to the library's), and bad metric requests are
    400 naming the problem."""
    ref = "The council approved the park."
    r = client.post(
        "/v1/summarize",
        json={
            "document": "The council approved the new park. " * 3,
            "length": "short",
            "evaluate": {"metrics": ["rouge"], "references": [ref]},
        },
    ).json()
    from service.evals.scoring import rouge

    assert r["scores"] == pytest.approx(rouge(r["summary"], [ref]))
    a = client.post(
        "/v1/answer", json={"question": "Who?", "max_tokens": 4, "evaluate": {"metrics": ["qa"], "references": ["x"]}}
    ).json()
    assert set(a["scores"]) == {"exact_match", "f1", "containment"}
    assert client.post("/v1/answer", json={"question": "Who?"}).json()["scores"] is None
    assert_error(
        client.post("/v1/answer", json={"question": "Who?", "evaluate": {"metrics": ["qa"]}}), 400, "needs references"
    )
    assert_error(
        client.post("/v1/answer", json={"question": "Who?", "evaluate": {"metrics": ["bleu"]}}), 400, "unknown metric"
    )


def test_reference_free_hooks_per_request(client, tiny):
    """Without references: support (with its unsupported list), novelty and the model's own fluency,
    which runs through the engine thread while the server keeps serving."""
    doc = "The council approved the new park on Monday. Work starts in May."
    r = client.post(
        "/v1/summarize",
        json={"document": doc, "length": "short", "evaluate": {"metrics": ["support", "novelty", "fluency"]}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    from service.evals import scoring

    want = scoring.evaluate(["support", "novelty", "fluency"], body["summary"], [], doc, tiny)
    assert set(body["scores"]) == set(want) >= {"support", "unsupported", "novel_trigrams", "lm_logprob", "slor"}
    assert body["scores"]["unsupported"] == want["unsupported"]
    assert body["scores"]["slor"] == pytest.approx(want["slor"], abs=1e-4)


def test_score_traffic_fills_quality_histograms(tiny):
    """--score-traffic exports the reference-free hooks of every response as histograms, without high-cardinality
    labels."""
    with TestClient(build_app(tiny, score_traffic=True)) as c:
        assert c.post("/v1/answer", json={"question": "Who built the park?", "max_tokens": 8}).status_code == 200
        c.post("/v1/summarize", json={"document": "The council approved the park.", "length": "short"})
        text = c.get("/metrics").text
    assert "entities" not in text
    for task, metric in (("answer", "full_sentence"), ("answer", "support"), ("summarize", "novel_trigrams")):
        assert f'nlg_quality_score_count{{metric="{metric}",model_name="tiny-random",task="{task}"}} 1.0' in text
