"""Sampling: reproducible with a seed, the warpers do what `transformers`' do."""

from __future__ import annotations

import pytest
import torch

from service.engine.sampler import Sampler, penalize_repeats, repeated_ngram_tokens, truncate
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence
from service.errors import RequestFailed


def test_seeded_sampling_is_reproducible(tiny):
    """The same seed gives the same tokens and another seed other tokens."""
    prompt = [tiny.tokenizer.encode("once upon a time")]
    params = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)]
    a = tiny.engine.generate(prompt, params)[0].token_ids
    b = tiny.engine.generate(prompt, params)[0].token_ids
    c = tiny.engine.generate(prompt, [SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True)])
    assert a == b
    assert c[0].token_ids != a


def rows(*params: SamplingParams, prompt=(0,), output=()) -> list[Sequence]:
    """One sequence per params, each in its own cache slot."""
    return [Sequence(list(prompt), p, slot=i, output=list(output)) for i, p in enumerate(params)]


def test_top_k_one_and_tiny_top_p_are_greedy():
    """top_k=1 and a top_p below the best token's mass must leave only the most likely token (a top_p of
    1e-300 was 0 in float32 and once dropped every token)."""
    logits = torch.randn(3, 50)
    seqs = rows(SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-300))
    seqs += rows(SamplingParams(temperature=1.5, top_k=1, top_p=1e-6))
    assert Sampler().pick(seqs, logits) == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_best():
    """Each row keeps its own k: a row's k must not leak into its neighbours in the batched pass."""
    logits = torch.randn(2, 50)
    allowed = [set(torch.topk(row, k).indices.tolist()) for row, k in zip(logits, (3, 7))]
    seqs = rows(SamplingParams(temperature=2.0, top_k=3), SamplingParams(temperature=2.0, top_k=7))
    sampler = Sampler()
    for _ in range(200):
        a, b = sampler.pick(seqs, logits)
        assert a in allowed[0] and b in allowed[1]


def test_batched_processors_match_transformers():
    """Rows with different penalties, temperatures, top-k and top-p in one pass give, row by row, the
    logits `transformers`' own processors give (ties at the k-th logit kept, as there)."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 60)
    logits[1, :4] = logits[1].max() + 1  # four tied best logits
    seen_ids = torch.tensor([[3, 5, 5, 9], [1, 2, 2, 2], [7, 7, 7, 7], [0, 59, 30, 30]])
    penalty, temperature = [1.3, 0.5, 1.0, 4.0], [0.7, 1.0, 1.3, 2.0]
    top_k, top_p = [5, 2, 0, 0], [1.0, 1.0, 0.8, 0.3]
    seen = torch.zeros(4, 60, dtype=torch.bool).scatter(1, seen_ids, True)
    ours = penalize_repeats(logits, seen, torch.tensor(penalty)[:, None]) / torch.tensor(temperature)[:, None]
    ours = truncate(ours, torch.tensor([k or 60 for k in top_k]), torch.tensor([p if p < 1 else 2.0 for p in top_p]))
    for r in range(4):
        want = RepetitionPenaltyLogitsProcessor(penalty[r])(seen_ids[r : r + 1], logits[r : r + 1].clone())
        want = TemperatureLogitsWarper(temperature[r])(None, want)
        if top_k[r]:
            want = TopKLogitsWarper(top_k[r])(None, want)
        if top_p[r] < 1:
            want = TopPLogitsWarper(top_p[r])(None, want)
        assert torch.equal(torch.isinf(ours[r]), torch.isinf(want[0])), r
        assert torch.allclose(ours[r][~torch.isinf(ours[r])], want[0][~torch.isinf(want[0])]), r


def test_a_seeded_row_draws_the_same_whatever_its_batch():
    """Per-request generators: a seeded request gets the same tokens alone and beside other requests,
    seeded or not (one generator for the batch would hand its draws to whoever sits first)."""
    logits = torch.randn(8, 100)
    seeded = SamplingParams(temperature=1.0, seed=11)

    def alone() -> list[int]:
        sampler, seqs = Sampler(), rows(seeded)
        return [sampler.pick(seqs, logits[r : r + 1])[0] for r in range(8)]

    want = alone()
    for other in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, seed=3)):
        sampler, seqs = Sampler(), rows(other, seeded)
        assert [sampler.pick(seqs, torch.stack([torch.randn(100), logits[r]]))[1] for r in range(8)] == want
    assert alone() == want and len(set(want)) > 1


def test_the_draw_follows_the_probabilities():
    """The exponential race picks token i with probability p_i: 4,000 draws over 4 tokens land within
    4 standard deviations of each probability (a wrong noise or a wrong division skews them)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler, seqs = Sampler(), rows(SamplingParams(temperature=1.0, seed=0))
    draws = torch.tensor([sampler.pick(seqs, probs.log()[None])[0] for _ in range(4000)])
    share = torch.bincount(draws, minlength=4) / 4000
    assert ((share - probs).abs() < 4 * (probs * (1 - probs) / 4000).sqrt()).all(), share


def test_a_row_with_undefined_probabilities_fails_alone():
    """NaN logits in one sampled row fail that request; the greedy and sampled rows beside it go on."""
    logits = torch.randn(3, 20)
    logits[1] = float("nan")
    seqs = rows(SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0))
    out = Sampler().pick(seqs, logits)
    assert out[0] == int(logits[0].argmax()) and isinstance(out[1], RequestFailed) and isinstance(out[2], int)


def test_repetition_counts_follow_the_tokens_on_device():
    """The slot rows the penalty reads hold the prompt and every token made so far, and a new sequence
    in a slot starts from its own tokens, not its predecessor's."""
    sampler, cpu = Sampler(), torch.device("cpu")
    params = SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=1)
    first = rows(params, prompt=(2, 3))[0]
    for _ in range(5):
        first.output += sampler.pick([first], torch.randn(1, 30))
    prompt, counts = sampler._state([first], 30, cpu)
    assert (prompt | (counts > 0))[0].nonzero()[:, 0].tolist() == sorted({2, 3, *first.output})
    assert sampler.counts[0].sum() == 5
    second = rows(params, prompt=(7,), output=(8, 8))[0]
    prompt, counts = sampler._state([second], 30, cpu)
    assert (prompt | (counts > 0))[0].nonzero()[:, 0].tolist() == [7, 8]
    assert sampler.counts[0, 8] == 2 and sampler.counts[0].sum() == 2


def test_repetition_penalty_matches_transformers_in_generation(tiny):
    """End to end: greedy decoding with a repetition penalty picks transformers' tokens (the penalty
    state on device must equal the context tokens at every step)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt = tiny.tokenizer.encode("the the the cat")
    out = tiny.engine.generate([prompt], [SamplingParams(max_tokens=12, repetition_penalty=1.8, ignore_eos=True)])
    ids = list(prompt)
    processor = RepetitionPenaltyLogitsProcessor(1.8)
    for _ in range(12):
        logits = tiny.engine.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1:]
        ids.append(int(processor(torch.tensor([ids]), logits.float()).argmax()))
    assert out[0].token_ids == ids[len(prompt) :]


def test_openai_penalties_and_logit_bias_match_a_plain_loop(tiny):
    """presence_penalty, frequency_penalty and logit_bias equal OpenAI's definition applied in a plain loop
    over full forwards: logit - frequency x (times generated) - presence x (generated at all) + bias, beside
    a repetition penalty (greedy, so the tokens say whether every step's logits were right)."""
    prompt = tiny.tokenizer.encode("the the the cat")
    bias = ((41, 0.7), (83, -0.4))
    sp = SamplingParams(
        max_tokens=16,
        presence_penalty=2.0,
        frequency_penalty=1.5,
        logit_bias=bias,
        repetition_penalty=1.2,
        ignore_eos=True,
    )
    out = tiny.engine.generate([prompt, prompt], [sp, SamplingParams(max_tokens=16, ignore_eos=True)])
    ids = list(prompt)
    for _ in range(16):
        logits = tiny.engine.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1].float()
        for token, value in bias:
            logits[token] += value
        made = torch.bincount(torch.tensor(ids[len(prompt) :], dtype=torch.long), minlength=logits.numel())
        logits = logits - 1.5 * made - 2.0 * (made > 0)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / 1.2, logits * 1.2), logits)
        ids.append(int(logits.argmax()))
    assert out[0].token_ids == ids[len(prompt) :] and out[0].token_ids != out[1].token_ids


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"repetition_penalty": 0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": float("nan")},
        {"logit_bias": ((1, 101.0),)},
        {"prompt_logprobs": 21},
    ],
)
def test_invalid_params_are_refused(bad):
    """Sampling parameters outside their domain are refused before they reach the sampler."""
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_repeated_ngram_tokens():
    """The n-gram ban finds exactly the tokens that would repeat an n-gram of the output."""
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
    """stop_token_ids end generation at that token, which is not returned."""
    prompt = [tiny.tokenizer.encode("abc")]
    free = tiny.engine.generate(prompt, [SamplingParams(max_tokens=20, ignore_eos=True)])[0].token_ids
    stop = free[5]
    out = tiny.engine.generate(prompt, [SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(stop,))])[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(stop)]
