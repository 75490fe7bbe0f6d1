"""The scheduler alone, no model: the plan it makes for given queues and free blocks, and what `update`
does with the tokens a runner would give back (as vLLM's tests/v1/core/test_scheduler.py does)."""

from __future__ import annotations

import torch

from service.engine.blocks import BlockPool
from service.engine.checks import Limits
from service.engine.plan import Launched, Picked, StepOutput
from service.engine.sampling_params import SamplingParams
from service.engine.scheduler import Scheduler, SchedulerConfig
from service.engine.sequence import Sequence, SequenceOutput, TokenLogprob

END = 99  # the model's end token in these tests


def scheduler(blocks: int = 64, slots: int = 2, region: int = 8, **config) -> Scheduler:
    config = SchedulerConfig(Limits(context=256, vocab_size=100), frozenset({END}), **config)
    return Scheduler(config, BlockPool(blocks, 16, region, slots), slots)


def seq(n: int, max_tokens: int = 8, **params) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=False, **params))


def tokens(*rows: tuple[Sequence, int]) -> StepOutput:
    """What a runner gives back when each of these sequences picked this token."""
    return StepOutput(picked=tuple(Picked(s, (t,)) for s, t in rows))


def test_prompts_are_chunked_within_the_step_budget_then_decode():
    """A 40-token prompt takes the whole 32-token budget of the first step; its rest and the next prompt share
    the second; then both decode one token a step."""
    b = scheduler(step_tokens=32)
    long, short = seq(40), seq(10)
    b.add(long)
    b.add(short)
    plan = b.schedule()
    assert plan.prefill == [(long, 32)] and not plan.decode  # the budget is spent on the first prompt
    assert [s.slot for s in b.running] == [0, 1] and len(long.blocks) == 2 and short.blocks == []
    b.update(plan, StepOutput())
    assert long.prefilled == 32
    plan = b.schedule()
    assert plan.prefill == [(long, 8), (short, 10)]
    b.update(plan, tokens((long, 7), (short, 8)))
    assert long.output == [7] and short.output == [8] and long.prefilled == 40
    plan = b.schedule()
    assert plan.decode == [long, short] and not plan.prefill
    b.update(plan, tokens((long, 5), (short, 6)))
    assert long.prefilled == 41 and long.output == [7, 5]


def test_admission_goes_by_priority_then_arrival_while_a_slot_is_free():
    """One slot: the earliest interactive sequence goes first, a batch one (priority 1) after every interactive
    one."""
    b = scheduler(slots=1)
    late, batch, first = seq(4), seq(4), seq(4)
    batch.priority = 1
    first.arrival, late.arrival = 1.0, 2.0
    for s in (batch, late, first):
        b.add(s)
    plan = b.schedule()
    assert plan.prefill == [(first, 4)] and b.waiting == [late, batch]


def test_stop_rules_end_sequences_and_free_their_blocks():
    """An end token ends a sequence (not part of its output), max_tokens ends another; both give every block
    back."""
    b = scheduler()
    stopped, long = seq(20, max_tokens=8), seq(3, max_tokens=2)
    b.add(stopped)
    b.add(long)
    b.update(plan := b.schedule(), tokens((stopped, 4), (long, 4)))
    assert b.pool.used() == 3  # two blocks for 20 positions, one for 3
    b.update(b.schedule(), tokens((stopped, END), (long, 5)))
    assert (stopped.finish_reason, stopped.output, stopped.end_token) == ("stop", [4], END)
    assert (long.finish_reason, long.output) == ("length", [4, 5])
    assert b.pool.used() == 0 and not b.running and not b.busy()
    assert plan.prefill == [(stopped, 20), (long, 3)]


def test_the_youngest_is_preempted_when_no_block_is_left():
    """Two sequences need a second block and one is left: the younger gives its blocks back and waits, to
    prefill again."""
    b = scheduler(blocks=4, region=1, slots=2)  # 3 blocks a sequence may hold: 48 positions
    old, young = seq(16, max_tokens=30), seq(16, max_tokens=30)
    b.add(old)
    b.add(young)
    b.update(b.schedule(), tokens((old, 1), (young, 1)))  # each holds one full block
    plan = b.schedule()  # both need a second block; one is left
    assert plan.decode == [old] and b.waiting == [young] and b.preemptions == 1
    assert young.prefilled == 0 and young.blocks == [] and young.output == [1]  # it prefills again later


def test_a_cached_prefix_is_not_prefilled_again():
    """A finished sequence's full blocks stay in the prefix cache: the same prompt again prefills only past
    them."""
    b = scheduler(slots=1)
    first = seq(40, max_tokens=1)
    b.add(first)
    b.update(b.schedule(), tokens((first, 3)))
    assert first.finish_reason == "length"
    again = seq(40, max_tokens=1)
    b.add(again)
    plan = b.schedule()
    assert plan.prefill == [(again, 8)] and again.prefilled == 32  # two blocks found in the prefix cache
    assert b.hits == 32 and b.queried == 80


def test_interleaved_prompts_keep_their_homes_and_their_cached_prefixes():
    """Two prompts taking turns, one at a time (two users' questions about two passages): each new one takes
    the slot whose home holds nothing cached, then the one cached longest ago, so the third finds the
    first's prefix at its home instead of prefilling it again (it used to write over it in slot 0, where
    the shared system prompt's block sent every prompt)."""
    b = scheduler(slots=2, region=8)
    system = list(range(80, 96))  # one full block every prompt starts with
    a_prompt = system + list(range(1, 41))
    b_prompt = system + list(range(40, 80))

    def run(prompt: list[int]) -> Sequence:
        s = Sequence(list(prompt), SamplingParams(max_tokens=1, ignore_eos=False))
        b.add(s)
        b.update(b.schedule(), tokens((s, 3)))
        assert s.finish_reason == "length"
        return s

    first, second = run(a_prompt), run(b_prompt)
    assert (first.slot, second.slot) == (0, 1)
    hits = b.hits
    third = run(a_prompt)
    assert third.slot == 0 and b.hits - hits == 48  # three full blocks of the first prompt, in its home
    fourth = run(system + [7] * 40)  # a new prompt: the home cached longest ago (the second's) goes
    assert fourth.slot == 1


def test_drafts_are_planned_for_greedy_rows_and_what_was_agreed_is_taken():
    """A greedy row whose last tokens occurred before gets a draft to verify; update takes the agreed tokens
    and the model's own next one."""
    b = scheduler(prompt_lookup=3)
    s = Sequence([5, 6, 7, 8, 5, 6], SamplingParams(max_tokens=10))
    b.add(s)
    b.update(b.schedule(), tokens((s, 7)))  # the prompt ends "5 6", then 7: "8 5 6" follows "6 7" before
    plan = b.schedule()
    assert plan.verify == [(s, [8, 5, 6])] and not plan.decode
    b.update(plan, StepOutput(picked=(Picked(s, (8, 5, 9)),)))  # two agreed, then the model's own token
    assert s.output == [7, 8, 5, 9] and s.prefilled == s.length - 1
    assert (b.drafted, b.accepted) == (3, 2)


def test_drafts_shrink_to_keep_the_forward_within_its_rows():
    """With more decoding rows, each one's draft is cut so that rows and drafts stay within `lookup_rows`
    (each drafted row costs a decoded one's once the matmuls are bound by arithmetic): 5 draft tokens for one
    row, 3 each for two, 1 each for three or four, none from five on."""
    for n, longest in [(1, 5), (2, 3), (3, 1), (4, 1), (5, 0), (8, 0)]:
        b = scheduler(slots=8, blocks=128, prompt_lookup=5, lookup_rows=8)
        rows = [Sequence([5, 6, 7, 8, 9, 10, 11, 5, 6], SamplingParams(max_tokens=20)) for _ in range(n)]
        for s in rows:
            b.add(s)
        b.update(b.schedule(), tokens(*[(s, 7) for s in rows]))  # "6 7" occurred before: a draft follows
        plan = b.schedule()
        drafts = [len(d) for _, d in plan.verify]
        assert (max(drafts) if drafts else 0) == longest, n
        assert n + sum(drafts) <= 8


def test_greedy_steps_launched_ahead_are_chained_then_collected():
    """On the launch-ahead path the next step is chained to the one on its way and collects its tokens; no step
    is launched past max_tokens."""
    b = scheduler(launch_ahead=True)
    s = seq(4, max_tokens=3)
    b.add(s)
    b.update(b.schedule(), tokens((s, 10)))
    plan = b.schedule()
    assert plan.launch == [s] and not plan.chained
    b.update(plan, StepOutput(launched=Launched([s], torch.tensor([11, 0]), None)))
    assert s.output == [10] and b.busy()  # its token is on its way
    plan = b.schedule()
    assert plan.chained and plan.launch == [s] and plan.collect.seqs == [s]
    b.update(plan, StepOutput(picked=(Picked(s, (11,)),), launched=Launched([s], torch.tensor([12, 0]), None)))
    assert s.output == [10, 11]
    plan = b.schedule()  # the token on its way is the last of max_tokens: nothing is launched past it
    assert not plan.launch and plan.collect is not None
    b.update(plan, StepOutput(picked=(Picked(s, (12,)),)))
    assert s.output == [10, 11, 12] and s.finish_reason == "length" and not b.busy()


def test_what_each_sequence_gained_leaves_as_values_once():
    """After a turn each sequence's new tokens, log-probabilities and end are taken as one value each, in the
    order they were gained, with the prompt tokens in the cache after a prefill chunk; the prompt's
    log-probabilities go once, with the first tokens; a sequence
    stopped from outside (its consumer) ends with its next output and is skipped by a later pick."""
    b = scheduler()
    a, c = seq(4, max_tokens=3, prompt_logprobs=0), seq(5, max_tokens=8)
    b.add(a)
    b.add(c)
    plan = b.schedule()
    scored = (None, TokenLogprob(-1.0, []), TokenLogprob(-2.0, []), TokenLogprob(-3.0, []))
    b.update(plan, StepOutput(prompt_logprobs=((a, scored),), picked=(Picked(a, (7,)), Picked(c, (8,)))))
    (s1, o1), (s2, o2) = b.take_outputs()
    assert (s1, o1) == (a, SequenceOutput((7,), (), scored, prefilled=4))  # its whole prompt in the cache
    assert (s2, o2) == (c, SequenceOutput((8,), prefilled=5))
    assert b.take_outputs() == []  # taken once
    b.update(b.schedule(), tokens((a, END), (c, 9)))
    b.finish(c, "stop")  # its consumer found a stop string in 9
    b.update(b.schedule(), tokens((c, 10)))
    assert b.take_outputs() == [(a, SequenceOutput(finished=True)), (c, SequenceOutput((9,), finished=True))]
    assert c.output == [8, 9] and c.finish_reason == "stop" and not b.busy()
