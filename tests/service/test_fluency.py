"""Grammaticality hooks: LM fluency and SLOR from our engine equal the same numbers from `transformers`;
Link Grammar parses when installed and is refused with a clear note when not."""

from __future__ import annotations

import math

import pytest
import torch
from wordfreq import word_frequency

from service.evals import fluency, scoring


def test_fluency_equals_transformers_and_slor_subtracts_unigrams(tiny):
    """The fluency hook's log-probability equals transformers' on the same weights, and SLOR subtracts the unigram
    log-frequency."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny.directory), dtype=torch.float32).eval()
    text = "The cat sat on the mat."
    got = scoring.evaluate(["fluency"], text, [], None, tiny)
    ids = [tiny.tokenizer.hf.eos_token_id, *tiny.tokenizer.encode(text)]
    with torch.inference_mode():
        logp = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    total = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert got["lm_logprob"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)
    unigram = sum(math.log(word_frequency(w, "en")) for w in ["The", "cat", "sat", "on", "the", "mat"])
    assert got["slor"] == pytest.approx((total - unigram) / 6, abs=1e-4)


def test_fluency_needs_the_model():
    """The fluency hook without the model is a clear InvalidRequest, not an AttributeError."""
    with pytest.raises(ValueError, match="needs the model"):
        scoring.evaluate(["fluency"], "Some text.", [], None)


@pytest.mark.skipif(fluency.grammar_unavailable() is not None, reason="CMU Link Grammar is not installed")
def test_link_grammar_parses_sentences_without_unlinked_words():
    """Link Grammar accepts a grammatical sentence and refuses word salad (where it is installed)."""
    good = "Jason Mraz is engaged to Tristan Prettyman. The cat sat on the mat."
    assert scoring.evaluate(["grammar"], good, []) == {"grammar": 1.0}
    assert scoring.evaluate(["grammar"], good + " Mraz engaged is the to Prettyman of.", [])["grammar"] == 2 / 3


def test_link_grammar_absent_is_refused_with_the_install_hint(monkeypatch):
    """Without Link Grammar the grammar metric is refused with the apt line that installs it."""
    monkeypatch.setattr(fluency, "_linkgrammar", lambda: None)
    with pytest.raises(ValueError, match="apt install python3-link-grammar"):
        scoring.check(["grammar"], [])


@pytest.mark.slow
def test_smollm2_scores_a_sentence_above_its_scramble():
    """On the real model a sentence is more fluent than the same words scrambled: the hook measures what it claims."""
    from service.engine.generator import TextGenerator

    smol = TextGenerator.load("smollm2-135m-instruct")
    good = scoring.evaluate(["fluency"], "Jason Mraz is engaged to Tristan Prettyman.", [], None, smol)
    bad = scoring.evaluate(["fluency"], "Prettyman engaged Mraz to is Tristan Jason.", [], None, smol)
    assert good["lm_logprob"] > bad["lm_logprob"] and good["slor"] > bad["slor"] + 1
