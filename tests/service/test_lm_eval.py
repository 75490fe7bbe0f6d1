"""LAMBADA and WikiText scoring through our engine equal the same quantities computed with `transformers`
on the same weights (tiny model here; SmolLM2 on real data in the slow tests): log-likelihoods within
1e-4, greedy verdicts identical."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from service.cli.parser import main
from service.evals import lm_eval

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def hf_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny.directory), dtype=torch.float32).eval()


@torch.inference_mode()
def hf_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, and the argmax at each of those positions."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = logits.log_softmax(-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logits.argmax(-1)


def test_lambada_split_follows_the_harness(tiny):
    """LAMBADA's target is the whole last word with its leading space, as lm-evaluation-harness splits it."""
    context, target = lm_eval.lambada_pair(tiny.tokenizer, "the cat sat on the mat")
    assert tiny.tokenizer.decode(context) == "the cat sat on the"
    assert tiny.tokenizer.decode(target) == " mat"


def test_lambada_equals_transformers(tiny, hf_model):
    """LAMBADA verdicts and log-likelihoods equal transformers' on the same weights."""
    records = [json.loads(line) for line in (DATA / "lambada_first20.jsonl").read_text().splitlines()[:5]]
    records.append({"text": "aaaa aaaa aaaa aaaa"})  # whatever the random model predicts, judged the same way
    ours = lm_eval.lambada(tiny, records)
    for r, e in zip(records, ours["examples"]):
        context, target = lm_eval.lambada_pair(tiny.tokenizer, r["text"])
        logp, best = hf_token_logprobs(hf_model, context + target)
        n = len(target)
        assert e["loglik"] == pytest.approx(float(logp[-n:].sum()), abs=1e-4)
        assert e["correct"] == float(best[-n:].tolist() == target)
    mean_ll = sum(e["loglik"] for e in ours["examples"]) / len(records)
    assert ours["perplexity"] == pytest.approx(math.exp(-mean_ll))


def reference_nll(model, ids: list[int], window: int, stride: int) -> float:
    """The sliding-window recipe of the `transformers` perplexity guide, on its own."""
    total, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        logp, _ = hf_token_logprobs(model, ids[begin:end])
        total -= float(logp[-min(target_len, len(logp)) :].sum())
        prev_end = end
        if end == len(ids):
            break
    return total


@pytest.mark.parametrize("window, stride", [(64, 63), (64, 16), (100_000, None)])
def test_wikitext_perplexity_equals_transformers(tiny, hf_model, window, stride):
    """Rolling-window perplexity equals transformers' for strided, overlapping and single windows."""
    text = (DATA / "wikitext2_test_head.txt").read_text(encoding="utf-8")[:1500]
    ids = tiny.tokenizer.encode(text)
    w = min(window, tiny.engine.context)  # the last case: the model's whole context per window
    s = stride or w - 1
    nll, scored = lm_eval.token_nll(tiny, ids, w, s)
    assert scored == len(ids) - 1
    assert nll == pytest.approx(reference_nll(hf_model, ids, w, s), rel=1e-5)
    report = lm_eval.perplexity(tiny, text, window, stride)
    assert report["window"] == w and report["stride"] == s
    assert report["metrics"]["token_perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-6)
    assert report["metrics"]["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2), rel=1e-6)


def test_bad_stride_and_short_text_are_refused(tiny):
    """A stride outside the window and a text of one token are refused with the reason."""
    with pytest.raises(ValueError, match="stride"):
        lm_eval.token_nll(tiny, [1, 2, 3], 8, 8)
    with pytest.raises(ValueError, match="fewer than two tokens"):
        lm_eval.perplexity(tiny, "x")


def test_cli_eval_lambada_and_wikitext(tmp_path, capsys):
    """`nlg eval lambada` and `nlg eval wikitext` run on real data files and report their metrics;
    `--limit` counts examples for LAMBADA and tokens for WikiText."""
    for task, data, limit in (("lambada", "lambada_first20.jsonl", 3), ("wikitext", "wikitext2_test_head.txt", 300)):
        out = tmp_path / task
        args = ["eval", task, "--model", "tiny-random", "--data", str(DATA / data), "--out", str(out), "--quiet"]
        assert main([*args, "--limit", str(limit), "--window", "256", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        report = json.loads((out / "report.json").read_text())
        assert summary["task"] == report["task"] == task and (out / "report.md").is_file()
    assert "examples" not in report and report["window"] == 256 and report["tokens_scored"] == 299
    lam = json.loads((tmp_path / "lambada" / "report.json").read_text())
    assert len(lam["examples"]) == 3 and 0 <= lam["metrics"]["accuracy"]["mean"] <= 1


@pytest.mark.slow
def test_smollm2_lambada_and_wikitext_equal_transformers():
    """The real default model on real data: LAMBADA accuracy identical and every target log-likelihood
    within 1e-3; WikiText token perplexity within 1e-4 relative (fp32 both sides)."""
    from model.loader import transformers_model
    from service.engine.generator import TextGenerator

    smol = TextGenerator.load("smollm2-135m-instruct")
    hf = transformers_model(smol.directory)
    records = [json.loads(line) for line in (DATA / "lambada_first20.jsonl").read_text().splitlines()]
    ours = lm_eval.lambada(smol, records)
    correct = []
    for r, e in zip(records, ours["examples"]):
        context, target = lm_eval.lambada_pair(smol.tokenizer, r["text"])
        logp, best = hf_token_logprobs(hf, context + target)
        assert e["loglik"] == pytest.approx(float(logp[-len(target) :].sum()), abs=1e-3)
        correct.append(float(best[-len(target) :].tolist() == target))
    assert [e["correct"] for e in ours["examples"]] == correct and 0 < sum(correct) < len(correct)

    text = (DATA / "wikitext2_test_head.txt").read_text(encoding="utf-8")
    ids = smol.tokenizer.encode(text)
    nll, scored = lm_eval.token_nll(smol, ids, 1024, 1023)
    assert nll / scored == pytest.approx(reference_nll(hf, ids, 1024, 1023) / scored, rel=1e-4)
