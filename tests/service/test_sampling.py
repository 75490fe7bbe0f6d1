"""Sampling: reproducible with a seed, the warpers do what `transformers`' do."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampling import SamplingParams, penalize_repeats, repeated_ngram_tokens, sample


def test_seeded_sampling_is_reproducible(tiny):
    prompt = [tiny.tokenizer.encode("once upon a time")]
    params = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)]
    a = tiny.engine.generate(prompt, params)[0].token_ids
    b = tiny.engine.generate(prompt, params)[0].token_ids
    c = tiny.engine.generate(prompt, [SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True)])
    assert a == b
    assert c[0].token_ids != a


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(50)
    g = torch.Generator().manual_seed(0)
    best = int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=1.5, top_k=1), torch.tensor([0]), g) == best
    assert sample(logits, SamplingParams(temperature=1.5, top_p=1e-6), torch.tensor([0]), g) == best


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(50)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert sample(logits, SamplingParams(temperature=2.0, top_k=3), torch.tensor([0]), g) in allowed


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 40)
    seen = torch.tensor([3, 5, 5, 9, 30])
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits.clone())
    assert torch.allclose(penalize_repeats(logits[0].clone(), seen, 1.3), want[0])


@pytest.mark.parametrize(
    "bad", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}]
)
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_repeated_ngram_tokens():
    out = [1, 2, 3, 1, 2]
    assert repeated_ngram_tokens(out, 3) == [3]  # "1 2" was followed by 3 before
    assert sorted(repeated_ngram_tokens(out, 1)) == sorted(out)
    assert repeated_ngram_tokens(out, 0) == [] and repeated_ngram_tokens([1], 3) == []


def test_no_repeat_ngram_holds_in_generation(tiny):
    """Guards the summarizer against loops like "The video is at CNN.com. The video is at CNN.com."."""
    prompt = [tiny.tokenizer.encode("loop")]
    out = tiny.engine.generate(prompt, [SamplingParams(max_tokens=60, no_repeat_ngram=3, ignore_eos=True)])[0]
    grams = [tuple(out.token_ids[i : i + 3]) for i in range(len(out.token_ids) - 2)]
    assert len(grams) == len(set(grams))


def test_stop_token_ids_end_generation_and_are_not_returned(tiny):
    prompt = [tiny.tokenizer.encode("abc")]
    free = tiny.engine.generate(prompt, [SamplingParams(max_tokens=20, ignore_eos=True)])[0].token_ids
    stop = free[5]
    out = tiny.engine.generate(prompt, [SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(stop,))])[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(stop)]
