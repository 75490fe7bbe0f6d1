"""Prompt-lookup speculation (`service.engine.lookup`, verified by `ModelRunner.execute`): drafts are looked up as
documented, and verifying them never changes what greedy decoding produces: tokens, stops, lengths,
processors, a cache short of blocks and the prefix cache after a speculated run."""

from __future__ import annotations

import pytest

from model.loader import load_model
from model.registry import resolve
from service.engine.core import Engine
from service.engine.lookup import draft
from service.engine.sampling_params import SamplingParams

LOOPED = [5, 6, 7, 8, 9] * 8 + [5, 6]  # a prompt whose n-grams recur: drafts are found from the start


def test_draft_takes_the_longest_final_ngram_at_its_latest_occurrence():
    """Guards the search: a longer n-gram wins over a later short one, the final n-gram itself is not a
    hit, a draft stops at the tokens' end, and nothing is guessed from a lone token."""
    assert draft([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]
    assert draft([1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3], 2) == [9, 7]  # [1, 2, 3]'s hit over [2, 3]'s later one
    assert draft([4, 1, 2, 7, 1, 2], 5) == [7, 1, 2]  # stops at the end of the tokens
    assert draft([1, 2, 3, 4], 3) == []  # no n-gram of 2 or more recurs
    assert draft([3, 1, 2, 3, 1, 2], 0) == []


@pytest.fixture(scope="module")
def model():
    return load_model(resolve("tiny-random"))


def run(model, prompts, params, lookup: int, **engine_args):
    engine = Engine(model, max_batch=len(prompts), prompt_lookup=lookup, **engine_args)
    out = engine.generate(prompts, [params] * len(prompts) if isinstance(params, SamplingParams) else params)
    return [(c.token_ids, c.finish_reason) for c in out], engine.scheduler


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=40, ignore_eos=True, no_repeat_ngram=3),
        SamplingParams(max_tokens=40, ignore_eos=True, logit_bias=((7, 2.5), (8, -1))),
        SamplingParams(max_tokens=7, ignore_eos=True),  # the draft is cut to the room left
    ],
    ids=["greedy", "no-repeat-ngram", "logit-bias", "max-tokens"],
)
@pytest.mark.parametrize("steps", ["torch", "ours"])
def test_speculation_gives_the_greedy_tokens(model, params, steps, steps_in):
    """Rows with and without drafts in one verification forward; the greedy processors apply at every
    draft position as they would step by step; with our kernels' attention (a verify step's queries get the
    bits a decode step gives them) as with torch's."""
    prompts = [LOOPED, [11, 12, 13, 14], LOOPED[3:] + [40, 41]]
    with steps_in(model, steps):
        want, _ = run(model, prompts, params, 0)
        got, scheduler = run(model, prompts, params, 5)
    assert got == want
    assert scheduler.drafted > 0  # it did speculate


def test_a_stop_token_inside_an_accepted_draft_ends_the_sequence_there(model):
    """Accepted tokens are taken one by one: a stop token among them ends the sequence at that token."""
    plain, _ = run(model, [LOOPED], SamplingParams(max_tokens=30, ignore_eos=True), 0)
    stop = plain[0][0][5]  # a token the output reaches
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop,))
    assert run(model, [LOOPED], params, 5)[0] == run(model, [LOOPED], params, 0)[0]


def test_speculation_with_few_blocks_and_then_from_the_prefix_cache(model):
    """A cache too small for both sequences (one is preempted; drafts that find no free block are
    dropped rather than preempting anyone), and a second run of the same prompts that starts from the
    blocks the first one registered, speculated tokens included."""
    prompts, params = [LOOPED, LOOPED[::-1]], SamplingParams(max_tokens=48, ignore_eos=True)
    want = [w[0] for w in run(model, prompts, params, 0)[0]]
    small = Engine(model, max_batch=2, prompt_lookup=8, kv_memory=9 * 16 * Engine(model).runner.token_bytes())
    assert [c.token_ids for c in small.generate(prompts, [params] * 2)] == want
    assert small.scheduler.preemptions > 0 and small.scheduler.drafted > 0
    cached = Engine(model, max_batch=2, prompt_lookup=8)
    for _ in range(2):
        assert [c.token_ids for c in cached.generate(prompts, [params] * 2)] == want
    assert cached.scheduler.hits > 0
