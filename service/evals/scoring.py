"""Quality hooks: one interface, a small registry, offline only.

A hook scores one prediction against references (and/or its source text) and returns named numbers;
`aggregate` averages a metric over examples with a seeded bootstrap confidence interval (the
`rouge-score` aggregator is unseeded, so the same run would not give the same interval twice).

- `rouge`: `rouge-score` with stemming, rouge1/2/L/Lsum precision, recall, F1; sentences are put on
  their own lines for rougeLsum with a rule (no NLTK download). Several references: the best F1 wins.
- `qa`: the SQuAD v1.1 official rules (normalize, exact match, token F1, best over golds) plus
  `containment`: a normalized gold answer inside the normalized prediction, which is what a correct
  full-sentence answer earns (its exact match is 0).
- `sentence`: the full-sentence check; `abstain`: whether an answer says the passages do not answer it,
  or hedges. `support` (entity-level factual precision against the source)
  and `novelty` (how much is copied verbatim) are in `service.evals.factual`; `fluency` (LM log-probability
  and SLOR, with the served model) and `grammar` (CMU Link Grammar, optional) in `service.evals.fluency`.
  None of these needs references.

Scores are numbers, except `unsupported` (support's list of entities missing from the source).
"""

from __future__ import annotations

import collections
import re
import string
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.errors import DeadlineExceeded, InvalidRequest
from service.evals import factual, fluency
from service.tasks.answer import hedged, not_answered
from service.tasks.sentences import sentences

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
MAX_REFERENCE_CHARS = 10_000  # one reference (ROUGE-L is quadratic: ~0.3 s at this size)
MAX_REFERENCES_CHARS = 20_000  # all of one output's references
# One output scored at a time in the process: scoring is pure Python, and each thread doing it takes a
# share of the GIL from the engine thread (six at once starved generation for minutes).
_one_at_a_time = threading.Lock()


@dataclass(frozen=True)
class Hook:
    name: str
    needs_references: bool
    score: Callable[..., dict]  # (prediction, references, source, gen) -> {metric: value}
    needs_model: bool = False  # scores with the served model: run on the thread that may call it
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run here, or None


REGISTRY: dict[str, Hook] = {}


def register(hook: Hook) -> Hook:
    REGISTRY[hook.name] = hook
    return hook


def hook(name: str) -> Hook:
    if name not in REGISTRY:
        raise InvalidRequest(f"unknown metric {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def sentence_lines(text: str) -> str:
    """One sentence per line (rougeLsum's input format)."""
    return "\n".join(sentences(text))


_scorer = None


def rouge(prediction: str, references: list[str], source: str | None = None, gen=None) -> dict[str, float]:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    if not references:
        raise InvalidRequest("rouge needs at least one reference")
    out: dict[str, float] = {}
    for kind in ROUGE_TYPES:
        best = max(
            (_scorer.score(sentence_lines(r), sentence_lines(prediction))[kind] for r in references),
            key=lambda s: s.fmeasure,
        )
        out |= {f"{kind}_p": best.precision, f"{kind}_r": best.recall, f"{kind}_f": best.fmeasure}
    return out


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and articles, squeeze whitespace. Punctuation includes
    Unicode's (an en dash, curly quotes), which the official script's ASCII set misses: "24-10" answers
    a gold "24–10"."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa(prediction: str, references: list[str], source: str | None = None, gen=None) -> dict[str, float]:
    if not references:
        raise InvalidRequest("qa needs at least one gold answer")
    norm = normalize_answer(prediction)
    padded = f" {norm} "
    return {
        "exact_match": float(max(norm == normalize_answer(g) for g in references)),
        "f1": max(token_f1(prediction, g) for g in references),
        "containment": float(any(normalize_answer(g) and f" {normalize_answer(g)} " in padded for g in references)),
    }


def sentence(prediction: str, references: list[str] = (), source: str | None = None, gen=None) -> dict[str, float]:
    """A complete sentence: starts upper-case or with a digit, at least four words, ends in . ! or ?"""
    text = prediction.strip()
    starts = text[:1].isupper() or text[:1].isdigit()
    return {"full_sentence": float(len(text.split()) >= 4 and starts and text[-1:] in ".!?")}


def abstain(prediction: str, references: list[str] = (), source: str | None = None, gen=None) -> dict[str, float]:
    """Whether an answer says that the passages do not answer the question (`abstained`), and whether it
    hedges instead of stating a fact (`hedged`)."""
    return {"abstained": float(not_answered(prediction)), "hedged": float(hedged(prediction))}


register(Hook("rouge", True, rouge))
register(Hook("qa", True, qa))
register(Hook("sentence", False, sentence))
register(Hook("abstain", False, abstain))
register(Hook("support", False, factual.support))
register(Hook("novelty", False, factual.novelty))
register(Hook("fluency", False, fluency.fluency, needs_model=True))
register(Hook("grammar", False, fluency.grammar, unavailable=fluency.grammar_unavailable))


def aggregate(values: list[float], seed: int = 0, samples: int = 1000, level: float = 0.95) -> dict[str, float]:
    """Mean with a percentile bootstrap interval, reproducible for a given seed."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise InvalidRequest("nothing to aggregate")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high)}


def check(metrics: list[str], references: list[str]) -> None:
    """Refuse unknown metrics, metrics without the references they need, or ones that cannot run here,
    and references past the size bounds, before any generation."""
    longest = max(map(len, references), default=0)
    if longest > MAX_REFERENCE_CHARS or sum(map(len, references)) > MAX_REFERENCES_CHARS:
        raise InvalidRequest(
            f"references are at most {MAX_REFERENCE_CHARS} characters each and {MAX_REFERENCES_CHARS} in all",
            param="evaluate.references",
        )
    for name in metrics:
        h = hook(name)
        if h.needs_references and not references:
            raise InvalidRequest(f"metric {name!r} needs references")
        why = h.unavailable()
        if why:
            raise InvalidRequest(why)


def evaluate(
    metrics: list[str],
    prediction: str,
    references: list[str],
    source: str | None = None,
    gen=None,
    wait: float | None = None,
) -> dict:
    """Every metric's scores for one output; `gen` (the TextGenerator) for hooks that need the model. One
    output is scored at a time; `DeadlineExceeded` when the turn has not come within `wait` seconds."""
    check(metrics, references)
    if not _one_at_a_time.acquire(timeout=-1 if wait is None else max(wait, 0.0)):
        raise DeadlineExceeded("scoring did not start before the request's deadline (--request-timeout)")
    try:
        out: dict = {}
        for name in metrics:
            out |= hook(name).score(prediction, references, source, gen)
        return out
    finally:
        _one_at_a_time.release()


def numeric(scores: dict) -> dict[str, float]:
    """The scores that aggregate (not lists such as `unsupported`)."""
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
