"""Quality hooks against their references: rouge-score itself, and the SQuAD v1.1 rules."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from service.scoring import aggregate, entities, hook, normalize_answer, qa, rouge, sentence_lines, support

PAIRS = [
    ("The cat sat on the mat. It was happy.", "A cat was sitting on the mat. The cat seemed happy."),
    ("Police arrested two men on Friday.", "Two men were arrested by police late on Friday night."),
]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_equals_rouge_score(prediction, reference):
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    want = direct.score(sentence_lines(reference), sentence_lines(prediction))
    got = rouge(prediction, [reference])
    for kind, s in want.items():
        assert got[f"{kind}_f"] == pytest.approx(s.fmeasure)
        assert got[f"{kind}_p"] == pytest.approx(s.precision) and got[f"{kind}_r"] == pytest.approx(s.recall)


def test_rouge_lsum_sees_sentences():
    assert sentence_lines("One thing happened. Then another! Done.") == "One thing happened.\nThen another!\nDone."


def test_squad_rules_on_hand_checked_cases():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert qa("Denver Broncos", ["The Denver Broncos"])["exact_match"] == 1.0
    s = qa("the Broncos of Denver", ["Denver Broncos"])
    assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    assert qa("Carolina", ["Denver Broncos", "Broncos"])["f1"] == 0.0


def test_a_correct_full_sentence_is_contained_but_not_exact():
    s = qa("Jason Mraz is engaged to Tristan Prettyman.", ["Tristan Prettyman"])
    assert s["exact_match"] == 0.0 and s["containment"] == 1.0
    assert qa("He is engaged to Tristan.", ["Tristan Prettyman"])["containment"] == 0.0
    assert qa("It was 1999.", ["99"])["containment"] == 0.0  # whole words only


def test_bootstrap_interval_is_seeded():
    values = [0.1, 0.5, 0.4, 0.9, 0.3, 0.7]
    a, b = aggregate(values, seed=3), aggregate(values, seed=3)
    assert a == b and a["low"] <= a["mean"] <= a["high"]
    assert aggregate(values, seed=4) != a


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(ValueError, match="available: qa, rouge, sentence, support"):
        hook("bleu")


def test_support_counts_names_and_numbers_found_in_the_source():
    source = "Jason Mraz and Tristan Prettyman got engaged on Christmas Eve 2008."
    assert entities("The singer Jason Mraz married Tristan Prettyman in 2008.") == [
        "Jason Mraz",
        "Tristan Prettyman",
        "2008",
    ]
    assert support("Jason Mraz is engaged to Tristan Prettyman.", [], source)["support"] == 1.0
    s = support("Jason Mraz married Colbie Caillat in 2010.", [], source)
    assert s["entities"] == 3.0 and s["support"] == pytest.approx(1 / 3)
    assert support("It was lovely.", [], source)["support"] == 1.0
