"""`nlg eval lambada` and `nlg eval wikitext`: language-model quality from our engine's prompt
log-probabilities, by the rules the published numbers use.

LAMBADA follows lm-evaluation-harness `lambada_openai`: the context is the passage up to its last space,
the target is " " + its last word, encoded the harness's way (the whole string, less the context's
tokens). An example is correct when every target token is the greedy (argmax) next token; perplexity is
exp of minus the mean target log-likelihood over examples.

WikiText perplexity scores the whole file as one token stream in windows of `window` tokens; each
window starts `stride` tokens after the last (the default, window - 1, scores every token once with one
token of carried context, like the harness's rolling windows; a smaller stride gives each token more
context). The first token of the file is not scored. Token perplexity is per scored token; word and
byte perplexity spread the same total over the file's whitespace-separated words and UTF-8 bytes, so
they compare across tokenizers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from service.engine.generator import TextGenerator
from service.errors import InvalidRequest
from service.evals.scoring import aggregate
from service.jobs.jsonl import split_lines


def lambada_pair(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids) of one passage."""
    context, _, word = text.strip().rpartition(" ")
    whole, n = tokenizer.encode(f"{context} {word}"), len(tokenizer.encode(context))
    return whole[:n], whole[n:]


def lambada_example(gen: TextGenerator, text: str) -> dict:
    context, target = lambada_pair(gen.tokenizer, text)
    scored = gen.prompt_logprobs(context + target, top=1)[len(context) :]
    return {
        "correct": float(all(s.top[0][0] == t for s, t in zip(scored, target))),
        "loglik": sum(s.logprob for s in scored),
        "target": gen.tokenizer.decode(target),
    }


def lambada(gen: TextGenerator, records: list[dict], progress: Callable[[], None] | None = None) -> dict:
    examples = []
    for i, r in enumerate(records):
        examples.append({"id": r.get("id", i)} | lambada_example(gen, r["text"]))
        if progress:
            progress()
    logliks = [e["loglik"] for e in examples]
    return {
        "metrics": {"accuracy": aggregate([e["correct"] for e in examples])},
        "perplexity": math.exp(-sum(logliks) / len(logliks)),
        "rule": "lm-evaluation-harness lambada_openai: every target token must be the greedy continuation",
        "examples": examples,
    }


def token_nll(gen: TextGenerator, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] and how many tokens it covers (see the module doc)."""
    if not 0 < stride < window:
        raise InvalidRequest(f"stride must be between 1 and window - 1, got stride {stride} and window {window}")
    total, done = 0.0, 1  # ids[:done] are scored (the first token never is)
    for begin in range(0, len(ids) - 1, stride):
        chunk = ids[begin : begin + window]
        logprobs = gen.prompt_logprobs(chunk)
        total -= sum(lp.logprob for lp in logprobs[done - begin :])
        done = begin + len(chunk)
        if done == len(ids):
            break
    return total, len(ids) - 1


def perplexity(gen: TextGenerator, text: str, window: int = 2048, stride: int | None = None, limit=None) -> dict:
    """Token, word and byte perplexity of `text` (its first `limit` tokens, words and bytes counted
    over the text those tokens spell)."""
    window = min(window, gen.engine.context)
    stride = stride or window - 1
    ids = gen.tokenizer.encode(text)
    if limit is not None and limit < len(ids):
        ids = ids[:limit]
        text = gen.tokenizer.decode(ids)
    if len(ids) < 2:
        raise InvalidRequest("the text has fewer than two tokens: nothing to score")
    nll, tokens = token_nll(gen, ids, window, stride)
    words, nbytes = len(text.split()), len(text.encode("utf-8"))
    return {
        "metrics": {
            "token_perplexity": math.exp(nll / tokens),
            "word_perplexity": math.exp(nll / words),
            "byte_perplexity": math.exp(nll / nbytes),
            "bits_per_byte": nll / nbytes / math.log(2),
        },
        "window": window,
        "stride": stride,
        "tokens_scored": tokens,
        "words": words,
        "bytes": nbytes,
    }


def run(gen: TextGenerator, task: str, data: Path, out_dir: Path, limit=None, window=2048, stride=None, progress=None):
    if not data.is_file():
        raise FileNotFoundError(f"no such file: {data}")
    text = data.read_text(encoding="utf-8")
    if task == "lambada":
        records = [json.loads(line) for line in split_lines(text) if line.strip()][:limit]
        report = {"task": task, "model": gen.name, "data": str(data)} | lambada(gen, records, progress)
    else:
        report = {"task": task, "model": gen.name, "data": str(data)} | perplexity(gen, text, window, stride, limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out_dir / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# {report['task']}: {report['model']} on {Path(report['data']).name}", ""]
    if report["task"] == "lambada":
        acc = report["metrics"]["accuracy"]
        lines += [
            f"{len(report['examples'])} examples; rule: {report['rule']}",
            "",
            "| accuracy | 95% interval | target perplexity |",
            "| --- | --- | --- |",
            f"| {acc['mean']:.4f} | {acc['low']:.4f} - {acc['high']:.4f} | {report['perplexity']:.2f} |",
        ]
    else:
        m = report["metrics"]
        lines += [
            f"{report['tokens_scored']} tokens scored in windows of {report['window']} tokens, stride "
            f"{report['stride']}; {report['words']} words, {report['bytes']} bytes",
            "",
            "| token perplexity | word perplexity | byte perplexity | bits per byte |",
            "| --- | --- | --- | --- |",
            f"| {m['token_perplexity']:.3f} | {m['word_perplexity']:.3f} | {m['byte_perplexity']:.4f} | "
            f"{m['bits_per_byte']:.4f} |",
        ]
    return "\n".join(lines) + "\n"
