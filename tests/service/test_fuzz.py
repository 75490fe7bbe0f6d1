"""Schemathesis over the app's own OpenAPI schema against a live tiny-random server: every operation,
valid and invalid requests, a bounded number of examples, each sent as generated and again with the
right API key (and once more naming the served model, which a fuzzer never guesses); then the hostile
values schemathesis does not make (JSON nested hundreds of levels deep in any field, Unicode digits as
token ids). Guards the issue "no request can take the server down": no 5xx but the documented 504 (a
deadline), the server alive and answering afterwards. Each run draws a fresh seed and prints it
(`NLG_FUZZ_SEED=N` repeats a run); `make fuzz` runs more examples."""

from __future__ import annotations

import collections
import itertools
import json
import os
import random

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from service.server.app import build_app

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("NLG_FUZZ_EXAMPLES", "15"))  # per operation and mode (valid, invalid)
SEED = int(os.environ.get("NLG_FUZZ_SEED") or random.randrange(2**32))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True
)


@pytest.fixture(scope="module")
def server(tiny, serve, own_engine):
    with serve(build_app(own_engine(tiny), api_keys=[KEY], slots=4, max_waiting=16, request_timeout=5)) as url:
        yield url
    # the module's last word: the server outlived the fuzzing (checked in test_still_up)


@schemathesis.check
def no_undocumented_server_error(ctx, response, case):
    """5xx only as 504 (a request past its deadline): a 500 or 503 means a request broke something."""
    if response.status_code >= 500 and response.status_code != 504:
        raise AssertionError(f"{response.status_code}: {response.text[:500]}")


def test_fuzz_every_operation(server):
    """Each generated request twice (as generated, then authenticated): never a 5xx but 504. (Driven
    operation by operation: schemathesis's pytest plugin does not load under this pytest.)"""
    print(f"fuzz seed: {SEED} (NLG_FUZZ_SEED={SEED} repeats this run)")
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    sent = []
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @seed(SEED)
        @given(case=operation.as_strategy(mode))
        @SETTINGS
        def fuzz(case):
            for headers in (None, {"Authorization": f"Bearer {KEY}"}):
                response = case.call(headers=headers, timeout=60)
                sent.append(response.status_code)
                case.validate_response(response, checks=[no_undocumented_server_error])
            if isinstance(case.body, dict) and "model" in case.body:  # past the 404: the model's own name
                case.body["model"] = "tiny-random"
                response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                sent.append(response.status_code)
                case.validate_response(response, checks=[no_undocumented_server_error])

        try:
            fuzz()
        except Unsatisfiable:  # no invalid request exists for an operation without inputs (/health)
            assert mode is schemathesis.GenerationMode.NEGATIVE
    print("fuzz statuses:", sorted(collections.Counter(sent).items()))
    assert len(sent) >= 2 * len(operations)
    assert any(code < 300 for code in sent) and any(400 <= code < 500 for code in sent)


BODIES = {
    "/v1/completions": {"model": "tiny-random", "prompt": "x", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny-random", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    "/v1/answer": {"question": "Who?", "passages": ["A text."], "max_tokens": 2},
    "/v1/summarize": {"document": "A text.", "length": "short"},
    "/v1/batches": {"input_file_id": "file-x", "endpoint": "/v1/completions"},
}
NOT_ASCII_DIGITS = st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=12).filter(
    lambda key: not (key.isascii() and key.isdigit())
)


def test_hostile_values(server):
    """JSON nested 65 to 5,000 levels deep in any field (RecursionError: 500 and 545 KB of traceback), and
    logit_bias keys that are digits to `str.isdigit` but not to `int` ("²", "①": 500): always 400."""
    print(f"fuzz seed: {SEED} (NLG_FUZZ_SEED={SEED} repeats this run)")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    @seed(SEED)
    @given(path=st.sampled_from(sorted(BODIES)), depth=st.integers(65, 5_000), data=st.data())
    @SETTINGS
    def deep(path, depth, data):
        body = BODIES[path]
        field = data.draw(st.sampled_from([*body, "metadata", "user"]))
        text = json.dumps(body | {field: "DEEP"}).replace('"DEEP"', "[" * depth + "1" + "]" * depth)
        r = httpx.post(f"{server}{path}", content=text, headers=headers, timeout=60)
        assert r.status_code == 400, (path, field, depth, r.text[:300])

    @seed(SEED)
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), key=NOT_ASCII_DIGITS)
    @SETTINGS
    def digits(path, key):
        r = httpx.post(f"{server}{path}", json=BODIES[path] | {"logit_bias": {key: 1}}, headers=headers, timeout=60)
        assert r.status_code == 400, (path, key, r.text[:300])

    deep()
    digits()


def test_still_up(server):
    """After the fuzzing: the server answers, generates, and is ready."""
    assert httpx.get(f"{server}/health").status_code == 200
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/v1/answer", json={"question": "Who?", "max_tokens": 4}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/ready", timeout=30).status_code == 200
