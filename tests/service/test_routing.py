"""The ingress's routing under `nlg serve --ray` (`service.server.routing`) and its merged metrics, without
a cluster: which text keys a request, and which replica a key, a load and a dead replica pick."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from service.server.cluster import merged_metrics
from service.server.routing import SPAN, PrefixRouter, prompt_text, span_keys

PASSAGE = "The dam on the river opened in 1936 and cost forty million dollars. " * 8  # over two spans


def body(data: dict) -> bytes:
    return json.dumps(data).encode()


def test_the_key_is_the_prompts_leading_text():
    """Passages before the question, the chat's turns in order, a summary's document; a form's boundary
    (new every request) is no part of it."""
    answer = prompt_text("/v1/answer", body({"question": "When?", "passages": [PASSAGE]}))
    assert answer.startswith(PASSAGE) and answer.endswith("When?")
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"text": "Hi"}]}]}
    assert prompt_text("/v1/chat/completions", body(chat)) == "system: Be brief.\nuser: Hi\n"
    assert prompt_text("/v1/summarize", body({"document": PASSAGE})) == PASSAGE
    assert prompt_text("/v1/completions", body({"prompt": "abc"})) == "abc"
    form = b"--XYZ\r\ncontent\r\n--XYZ--"
    assert prompt_text("/v1/answer", form, "multipart/form-data; boundary=XYZ") == "--\r\ncontent\r\n----"
    assert prompt_text("/v1/answer", b"{not json") == "{not json"


def test_span_keys_are_leading_runs_of_whole_spans():
    """One key per whole span; two texts share the keys of the spans they share from the start, and none
    after their first difference."""
    assert span_keys("x" * (SPAN - 1)) == []
    a, b = span_keys(PASSAGE + "When did it open?"), span_keys(PASSAGE + "What did it cost?")
    assert len(a) == len(PASSAGE) // SPAN and a == b
    assert span_keys("A" + PASSAGE)[0] != a[0]


def test_a_prompt_goes_where_its_prefix_went_unless_that_replica_is_full_or_down():
    """The longest remembered run picks its replica; past the bound, or down, the least loaded instead;
    without a key, the least loaded, rotating among equals."""
    router = PrefixRouter(3, bound=2)
    keys = span_keys(PASSAGE)
    first, why = router.order(keys)
    assert why == "least_loaded" and sorted(first) == [0, 1, 2]
    router.served(keys, 1)
    order, why = router.order(keys)
    assert (order[0], why) == (1, "prefix") and sorted(order) == [0, 1, 2]
    order, why = router.order(span_keys(PASSAGE + "more text " * 40))
    assert (order[0], why) == (1, "prefix")
    router.load[1] = 2
    order, why = router.order(keys)
    assert why == "least_loaded" and order[0] != 1 and order[-1] == 1
    router.load[1] = 0
    router.up[1] = False
    order, why = router.order(keys)
    assert why == "least_loaded" and order[-1] == 1
    router.up[1] = True
    assert {router.order([])[0][0] for _ in range(6)} == {0, 1, 2}


def test_metrics_of_every_replica_labelled_and_summed():
    """Each replica's series with its `replica` label, the sum as replica="all"; no sum of start times."""
    text = (
        "# HELP nlg_requests Requests.\n# TYPE nlg_requests counter\n"
        'nlg_requests_total{route="/v1/answer"} {}\n'
        "# HELP process_start_time_seconds Start.\n# TYPE process_start_time_seconds gauge\n"
        "process_start_time_seconds 100.0\n"
    )
    merged = merged_metrics({"0": text.replace("{}", "3.0"), "1": text.replace("{}", "4.0")})
    samples = {
        (s.name, s.labels.get("replica")): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples[("nlg_requests_total", "0")] == 3.0 and samples[("nlg_requests_total", "1")] == 4.0
    assert samples[("nlg_requests_total", "all")] == 7.0
    assert ("process_start_time_seconds", "all") not in samples and ("process_start_time_seconds", "1") in samples
    assert merged_metrics({}) == ""
