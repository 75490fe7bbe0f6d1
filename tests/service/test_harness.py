"""lm-evaluation-harness, unmodified and with its defaults, against a live server: `local-completions` scores
LAMBADA through `/v1/completions` (token-id prompts, echo, logprobs, max_tokens 1) and agrees with
`nlg eval lambada`; `local-completions` and `local-chat-completions` run a generate_until task and return
what the server generates greedily."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from service.evals import lm_eval as ours
from service.server.app import build_app

DATA = Path(__file__).resolve().parents[1] / "data"
pytestmark = pytest.mark.slow

LAMBADA = """task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GENERATE = """task: continue_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{text.split(' ')[:8]|join(' ')}}}}"
doc_to_target: "{{{{text}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def harness(tiny, serve, tmp_path_factory, own_engine):
    evaluator = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = tmp_path_factory.mktemp("tasks")
    data = DATA / "lambada_first20.jsonl"
    (tasks / "lambada_local.yaml").write_text(LAMBADA.format(data=data))
    (tasks / "continue_local.yaml").write_text(GENERATE.format(data=data))
    manager = TaskManager(include_path=str(tasks))
    with serve(build_app(own_engine(tiny))) as url:

        def run(model: str, endpoint: str, task: str, limit: int | None = None, **extra) -> dict:
            args = f"model=tiny-random,base_url={url}/v1/{endpoint},tokenizer={tiny.directory},max_length=2048"
            return evaluator.simple_evaluate(
                model=model,
                model_args=args,
                tasks=[task],
                task_manager=manager,
                limit=limit,
                log_samples=True,
                bootstrap_iters=0,  # no forked bootstrap pool: a fork of this threaded process hung in CI
                **extra,
            )

        yield run


def test_lambada_through_the_harness_equals_nlg_eval(tiny, harness):
    """The harness's accuracy and perplexity over 20 LAMBADA passages equal `nlg eval lambada`'s (it failed
    with 422 on token-id prompts before)."""
    out = harness("local-completions", "completions", "lambada_local")["results"]["lambada_local"]
    records = [json.loads(line) for line in (DATA / "lambada_first20.jsonl").read_text().splitlines()]
    want = ours.lambada(tiny, records)
    assert out["acc,none"] == pytest.approx(want["metrics"]["accuracy"]["mean"])
    assert out["perplexity,none"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert math.isfinite(out["perplexity,none"])


@pytest.mark.parametrize(
    "model, endpoint", [("local-completions", "completions"), ("local-chat-completions", "chat/completions")]
)
def test_generate_until_through_the_harness(tiny, harness, model, endpoint):
    """generate_until through both harness clients returns the server's greedy continuation, cut at the
    task's stop string."""
    from service.engine.sampling_params import SamplingParams

    extra = {"apply_chat_template": True} if "chat" in endpoint else {}
    run = harness(model, endpoint, "continue_local", limit=3, **extra)
    samples = run["samples"]["continue_local"]
    assert len(samples) == 3
    for s in samples:
        prompt = s["arguments"][0][0]  # the text, or (for chat) the messages as JSON in a 1-tuple
        ids = tiny.tokenizer.chat(json.loads(prompt[0])) if "chat" in endpoint else tiny.tokenizer.encode(prompt)
        want = tiny.generate([ids], [SamplingParams(max_tokens=8, stop=("\n",))])[0].text
        assert s["resps"][0][0] == want
