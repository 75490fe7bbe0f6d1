"""`nlg eval` on tiny-random: the report's shape, the Lead-3 baseline, and the files it writes."""

from __future__ import annotations

import json

from service.cli.parser import main
from service.evals.bulk import lead3, run_eval
from service.evals.scoring import sentence


def test_eval_qa_writes_report_table_and_plot(tiny, tmp_path):
    """`nlg eval qa` writes report.json with bootstrap intervals per metric, the markdown table and the plot, in
    input order."""
    data = tmp_path / "qa.jsonl"
    rows = [
        {"id": "a", "question": "Who won?", "context": "The Broncos won.", "answers": ["Broncos"]},
        {"id": "b", "question": "When?", "context": None, "answers": ["1999"]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_eval(tiny, "qa", data, tmp_path / "out", workers=2)
    assert [e["id"] for e in report["examples"]] == ["a", "b"]
    free = {"support", "entities", "full_sentence", "lm_logprob", "slor", "abstained", "hedged"} | (
        {"grammar"} if "grammar" in report["metrics"] else set()
    )
    assert set(report["metrics"]) == {"exact_match", "f1", "containment"} | free
    assert isinstance(report["examples"][0]["scores"]["unsupported"], list)  # per example, not aggregated
    assert report["entity_finder"] and report["link_grammar"]
    assert all(set(m) == {"mean", "low", "high"} for m in report["metrics"].values())
    for name in ("report.json", "report.md", "scores.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_eval_qa_with_retrieval_answers_from_the_pooled_contexts(tiny, tmp_path):
    """`nlg eval qa --retrieve`: each question is answered from the passages ranked best among every
    example's context, and `retrieved_gold` says whether its own context was among them (here, with four
    contexts and distinct facts, every one is found; a question without a context has none to find)."""
    data = tmp_path / "qa.jsonl"
    facts = [
        "The Broncos won the final in Denver.",
        "Paris is the capital of France.",
        "Water boils at 100 degrees.",
        "The violin has four strings.",
    ]
    questions = [
        "Who won the final in Denver?",
        "What is the capital of France?",
        "When does water boil?",
        "How many strings has the violin?",
    ]
    rows = [
        {"id": str(i), "question": q, "context": c, "answers": ["x"]} for i, (q, c) in enumerate(zip(questions, facts))
    ]
    rows.append({"id": "none", "question": "Who painted it?", "context": None, "answers": ["x"]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_eval(tiny, "qa", data, tmp_path / "out", workers=2, retrieve=True)
    assert report["retrieval"] is True
    assert [e["scores"]["retrieved_gold"] for e in report["examples"]] == [1.0] * 4 + [0.0]


def test_eval_summarize_scores_lead3_beside(capsys, tmp_path):
    """`nlg eval summarize` scores the Lead-3 baseline beside our summaries from the same references."""
    data = tmp_path / "sum.jsonl"
    doc = "The mayor opened the bridge. Traffic was heavy. Crowds cheered. Later it rained."
    data.write_text(json.dumps({"id": "x", "document": doc, "summary": "Mayor opens bridge.   Crowds cheer."}) + "\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "summarize",
                "--data",
                str(data),
                "--model",
                "tiny-random",
                "--out",
                str(out),
                "--quiet",
                "--json",
                "--length",
                "short",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert {"rouge1_f", "rougeLsum_f", "lead3_rouge1_f"} <= set(metrics)
    assert metrics["lead3_rouge1_f"]["mean"] > 0.3


def test_helpers():
    """Lead-3 takes the first three sentences; the full-sentence hook wants a capitalized sentence with an end
    mark."""
    assert lead3("One. Two. Three. Four.") == "One.\nTwo.\nThree."
    assert sentence("Paris is the capital of France.") == {"full_sentence": 1.0}
    assert sentence("Paris")["full_sentence"] == 0.0 and sentence("paris is the capital")["full_sentence"] == 0.0


def test_other_passages_come_from_another_article_without_the_answer(tmp_path):
    """--other-passages: each question gets the next record's text of the other file, its first sentences to
    about its own context's length, skipping one that holds a gold answer."""
    from service.evals.bulk import mismatched

    other = tmp_path / "news.jsonl"
    docs = ["The Broncos won the game. It rained all day.", "Stocks fell. Oil rose. Gold was flat. Bonds too."]
    other.write_text("".join(json.dumps({"document": d}) + "\n" for d in docs))
    records = [
        {"question": "Who won?", "context": "x" * 20, "answers": ["Broncos"]},
        {"question": "What rose?", "context": "y" * 12, "answers": ["cotton"]},
    ]
    assert mismatched(records, other) == ["Stocks fell. Oil rose.", "The Broncos won the game."]
