"""One batch record: its fields checked, its task run, its result fields (and scores when it asks)."""

from __future__ import annotations

from service.engine.generator import TextGenerator
from service.errors import InvalidRequest
from service.evals import scoring
from service.tasks.answer import answer, answer_source
from service.tasks.summarize import summarize

BATCH_PRIORITY = 1  # below interactive requests (0)


def run_record(gen: TextGenerator, task: str, record: dict) -> dict:
    """One record's result fields; raises `InvalidRequest` for a bad record. A record may carry
    `evaluate: {metrics, references?}`, as the HTTP requests do: its result then has `scores`."""
    if not isinstance(record, dict):
        raise InvalidRequest("a record must be a JSON object")
    metrics, references = _evaluate(record)
    if task == "summarize":
        document = _text(record, "document")
        s = summarize(gen, document, record.get("length", "medium"), record.get("max_words"), priority=BATCH_PRIORITY)
        out = {"summary": s.summary, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}
        prediction, source = s.summary, document
    else:
        passages = record.get("passages") or []
        if not isinstance(passages, list) or not all(isinstance(p, str) for p in passages):
            raise InvalidRequest("passages must be a list of strings")
        question = _text(record, "question")
        a = answer(gen, question, passages, priority=BATCH_PRIORITY)
        out = {
            "answer": a.answer,
            "passage_index": a.passage_index,
            "answered": a.answered,
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
        }
        prediction, source = a.answer, answer_source(question, passages)
    if metrics:
        out["scores"] = scoring.evaluate(metrics, prediction, references, source, gen)
    return out


def _evaluate(record: dict) -> tuple[list[str], list[str]]:
    """The record's metrics and references, checked before anything is generated."""
    ev = record.get("evaluate")
    if ev is None:
        return [], []
    metrics, references = (ev.get("metrics"), ev.get("references", [])) if isinstance(ev, dict) else (None, None)
    if not isinstance(metrics, list) or not metrics or not isinstance(references, list):
        raise InvalidRequest("evaluate must be {metrics: [names], references?: [texts]}")
    if not all(isinstance(x, str) for x in metrics + references):
        raise InvalidRequest("evaluate's metrics and references must be strings")
    scoring.check(metrics, references)
    return metrics, references


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise InvalidRequest(f"missing string field {field!r}")
    return value
