"""`nlg eval summarize|qa`: run a task over a JSONL data set and score every output with the quality
hooks; writes `report.json` (aggregate scores with seeded bootstrap intervals under `metrics`; per
example `id`, `prediction`, `references` and `scores` under `examples`), `report.md` (a table) and
`scores.png` (score distributions).

Data: `{id, document, summary}` lines for summarize (CNN/DM highlight sentences separated by three
spaces become lines), `{id, question, context|null, answers[]}` for qa. Summaries are scored beside
Lead-3 (the document's first three complete sentences), the classic extractive baseline.

qa with `other` passages asks each question of another article's passage (none of its gold answers in
it) instead of its own: a right answer says that the passage does not answer (`abstained`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from service.documents import Document, Part
from service.engine.generator import TextGenerator
from service.errors import InvalidRequest
from service.evals import factual, fluency
from service.evals.scoring import aggregate, evaluate, numeric, qa, rouge
from service.jobs.files import in_flight
from service.jobs.jsonl import split_lines
from service.jobs.records import BATCH_PRIORITY
from service.retrieval import passages, rank
from service.tasks.answer import answer, answer_source
from service.tasks.sentences import is_complete, sentences
from service.tasks.summarize import summarize

MAIN = {"summarize": "rouge1_f", "qa": "containment"}


def lead3(document: str) -> str:
    """The document's first three complete sentences (lines without an end mark, such as a page's
    share buttons or a title, are skipped)."""
    return "\n".join([s for s in sentences(document) if is_complete(s)][:3])


def reference_free() -> list[str]:
    """The reference-free hooks every example gets: Link Grammar only where it is installed."""
    return ["support", "sentence", "fluency"] + (["grammar"] if fluency.grammar_unavailable() is None else [])


def score_example(
    task: str, record: dict, gen: TextGenerator, length: str, pool: list | None = None, other: str | None = None
) -> dict:
    """One example's output and scores. qa with a `pool` (`service.retrieval` passages of every example's
    context): the question is answered from the passages ranked best for it (`service.retrieval.TOP`),
    not from its own context, and `retrieved_gold` says whether its context was among them; with `other`,
    from that passage alone."""
    if task == "summarize":
        refs = [record["summary"].replace("   ", "\n")]
        s = summarize(gen, record["document"], length, priority=BATCH_PRIORITY)
        scores = rouge(s.summary, refs) | evaluate(
            [*reference_free(), "novelty"], s.summary, refs, record["document"], gen
        )
        scores |= {f"lead3_{k}": v for k, v in rouge(lead3(record["document"]), refs).items()}
        return {"id": record.get("id"), "prediction": s.summary, "references": refs, "scores": scores}
    passages = [other] if other else [record["context"]] if record.get("context") else []
    recall = {}
    if pool is not None:
        found = rank(record["question"], pool)
        recall = {"retrieved_gold": float(any(p.text in (record.get("context") or "") for p in found))}
        passages = [p.text for p in found]
    a = answer(gen, record["question"], passages, priority=BATCH_PRIORITY)
    source = answer_source(record["question"], passages)
    free = evaluate([*reference_free(), "abstain"], a.answer, [], source, gen)
    scores = qa(a.answer, record["answers"]) | recall | free
    return {"id": record.get("id"), "prediction": a.answer, "references": record["answers"], "scores": scores}


def run_eval(
    gen: TextGenerator,
    task: str,
    data: Path,
    out_dir: Path,
    limit: int | None = None,
    length: str = "medium",
    workers: int = 8,
    progress: Callable[[], None] | None = None,
    retrieve: bool = False,
    other_passages: Path | None = None,
) -> dict:
    """Score every example (`retrieve`: qa over the pooled contexts of all examples; `other_passages`: a
    JSONL file whose records' `context` or `document` give each question another article's passage,
    `score_example`)."""
    if task not in MAIN:
        raise InvalidRequest(f"unknown eval task {task!r}: {', '.join(MAIN)}")
    if not data.is_file():
        raise FileNotFoundError(f"no such file: {data}")
    records = [json.loads(line) for line in split_lines(data.read_text(encoding="utf-8")) if line.strip()]
    records = records[:limit] if limit else records
    done: list[tuple[int, dict]] = []  # results arrive out of order
    pool = None
    if retrieve:
        if task != "qa":
            raise InvalidRequest("--retrieve is for qa: questions answered from every example's context pooled")
        contexts = dict.fromkeys(r["context"] for r in records if r.get("context"))
        pool = passages([Document(f"context {i}", "txt", [Part("text", c)]) for i, c in enumerate(contexts)])

    def collect(result: tuple[int, dict]) -> None:
        done.append(result)
        if progress:
            progress()

    others = [None] * len(records)
    if other_passages is not None:
        if task != "qa" or retrieve:
            raise InvalidRequest("--other-passages is for qa, without --retrieve")
        others = mismatched(records, other_passages)

    def one(item: tuple[int, dict]) -> tuple[int, dict]:
        return item[0], score_example(task, item[1], gen, length, pool, others[item[0]])

    in_flight(gen, one, list(enumerate(records)), workers, collect)
    examples = [e for _, e in sorted(done, key=lambda x: x[0])]
    names = list(numeric(examples[0]["scores"])) if examples else []
    report = {
        "task": task,
        "model": gen.name,
        "data": str(data),
        "retrieval": retrieve,
        "other_passages": str(other_passages) if other_passages else None,
        "examples_scored": len(examples),
        "entity_finder": factual.ner_backend(),
        "link_grammar": fluency.grammar_unavailable() or "installed",
        "metrics": {n: aggregate([e["scores"][n] for e in examples]) for n in names},
        "examples": examples,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out_dir / "report.md").write_text(markdown(report))
    plot(report, out_dir / "scores.png")
    return report


def mismatched(records: list[dict], path: Path) -> list[str]:
    """For each question, a passage of another article: the text of `path`'s records in turn (`context` or
    `document`), its first sentences to about the length of the question's own context, skipping any that
    holds one of its gold answers."""
    lines = [line for line in split_lines(path.read_text(encoding="utf-8")) if line.strip()]
    texts = [r.get("context") or r.get("document") for r in map(json.loads, lines)]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InvalidRequest(f"{path} has no record with a context or a document")
    out, k = [], 0
    for r in records:
        for _ in range(len(texts)):
            passage = leading(texts[k % len(texts)], len(r.get("context") or "") or 800)
            k += 1
            if not qa(passage, r["answers"])["containment"]:
                break
        out.append(passage)
    return out


def leading(text: str, size: int) -> str:
    """The text's first sentences, as many as reach `size` characters."""
    taken: list[str] = []
    for s in sentences(text):
        taken.append(s)
        if len(" ".join(taken)) >= size:
            break
    return " ".join(taken)


def markdown(report: dict) -> str:
    lines = [
        f"# {report['task']}: {report['model']} on {Path(report['data']).parent.name} "
        f"({report['examples_scored']} examples)",
        "",
        f"Entities for `support`: {report['entity_finder']}. Link Grammar: {report['link_grammar']}.",
        "",
        "| metric | mean | 95% interval |",
        "| --- | --- | --- |",
    ]
    for name, m in report["metrics"].items():
        lines.append(f"| {name} | {m['mean']:.4f} | {m['low']:.4f} - {m['high']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        n
        for n in report["metrics"]
        if n in ("rouge1_f", "rouge2_f", "rougeLsum_f", "containment", "full_sentence", "support", "grammar")
    ]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.hist([e["scores"][name] for e in report["examples"]], bins=20, range=(0, 1))
        ax.set_title(f"{name}\nmean {report['metrics'][name]['mean']:.3f}", fontsize=8)
    fig.suptitle(f"{report['task']}: {report['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
