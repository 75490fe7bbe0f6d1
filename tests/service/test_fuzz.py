"""Schemathesis over the app's own OpenAPI schema against a live tiny-random server: every operation,
valid and invalid requests, a fixed seed, a bounded number of examples, each sent as generated and
again with the right API key (and once more naming the served model, which a fuzzer never guesses).
Guards the issue "no request can take the server down": no 5xx but the documented 504 (a deadline),
the server alive and answering afterwards. `make fuzz` runs more examples."""

from __future__ import annotations

import collections
import itertools
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from service.server.app import build_app

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("NLG_FUZZ_EXAMPLES", "15"))  # per operation and mode (valid, invalid)


@pytest.fixture(scope="module")
def server(tiny, serve):
    with serve(build_app(tiny, api_key=KEY, slots=4, max_waiting=16, request_timeout=5)) as url:
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
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    sent = []
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
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


def test_still_up(server):
    """After the fuzzing: the server answers, generates, and is ready."""
    assert httpx.get(f"{server}/health").status_code == 200
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/v1/answer", json={"question": "Who?", "max_tokens": 4}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/ready", timeout=30).status_code == 200
