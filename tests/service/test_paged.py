"""The paged KV cache's bookkeeping: blocks taken and given back, the prefix cache, waiting for blocks and
preemption, each checked against a run without them (same tokens, same log-probabilities)."""

from __future__ import annotations

import pytest
import torch

from service.engine.blocks import BlockPool
from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence
from service.errors import ContextOverflow


def test_pool_hands_out_home_blocks_when_asked_else_the_least_wanted_then_idle_ones():
    """Regions of 4 blocks: region 1 is slot 0's home; 0 (with the null block) and 2 are no one's. A block
    asked for by name is given when free; otherwise blocks outside the homes go first, then a home's last
    ones; idle cached blocks only when nothing is free, least recently released first."""
    pool = BlockPool(12, 4, region=4, slots=1)
    assert pool.capacity == 11 and pool.home(0) == 4
    assert pool.take(4) == 4 and pool.take(5) == 5
    assert [pool.take() for _ in range(9)] == [8, 1, 9, 2, 10, 3, 11, 7, 6]
    assert pool.take() is None and pool.take(4) is None  # everything is held
    k1, k2 = pool.keys([7] * 8)
    pool.register(4, k1)
    pool.register(5, k2)
    pool.release([4, 5, 9])
    assert pool.available() == 3 and pool.used() == 8
    assert pool.take() == 9  # free before idle
    assert pool.match([k1, k2, b"?"]) == [4, 5]  # the cached run, each held again
    pool.release([4, 5])  # idle again, 4 the least recently released
    assert pool.take() == 4 and pool.match([k1, k2]) == []  # evicted, so the run is gone
    assert pool.take(5) == 5 and pool.take() is None  # asked for by name: leaves the cache


def test_keys_name_the_whole_prefix():
    """A block's key hashes its parent's key, so equal blocks after different prefixes differ."""
    pool = BlockPool(4, 2, 2, 1)
    a, b = pool.keys([1, 2, 3, 4, 5]), pool.keys([9, 9, 3, 4])
    assert len(a) == 2 and a[1] != b[1]  # the same block after another prefix is another key
    assert pool.keys([1, 2, 3, 4], a[0], 1) == a[1:]  # keys go on from a parent
    assert BlockPool(4, 2, 2, 1).keys([1, 2]) != a[:1]  # a key of its own per pool: none can be precomputed


def small_engine(model, blocks: int, slots: int = 3) -> Engine:
    """An engine whose cache is `blocks` blocks of 16 positions (the null block included)."""
    engine = Engine(model, max_batch=slots)
    engine.runner.kv_memory = blocks * engine.runner.token_bytes() * engine.runner.block_size
    return engine


PARAMS = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)


def test_prefix_hits_give_the_tokens_and_logprobs_of_a_fresh_cache(varied):
    """A second request sharing a 140-token prefix prefills from block 8 on (128 tokens found) and gets the
    same tokens and log-probabilities as on an engine that computes everything (within 1e-4: its 14 new rows
    attend in our kernel, as rows of up to 16 do, the fresh engine's 142 in torch's; 1.4e-5 measured). (A
    shorter shared start is computed again in another slot rather than written over the first request's
    cached blocks.)"""
    rng = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, varied.config.vocab_size, (140,), generator=rng).tolist()
    engine = Engine(varied)
    engine.generate([prefix + [1, 2, 3]], [PARAMS])
    hits = engine.scheduler.hits
    second = engine.generate([prefix + [4, 5]], [PARAMS])[0]
    assert engine.scheduler.hits - hits == 128
    fresh = Engine(varied).generate([prefix + [4, 5]], [PARAMS])[0]
    assert second.token_ids == fresh.token_ids
    for a, b in zip(second.logprobs, fresh.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_interleaved_prompts_sharing_a_system_block_are_each_found_again(varied):
    """Two 166-token prompts that share their first block (a system prompt), asked in turns A, B, A, B: the
    second A and the second B each find their own 160 tokens cached (B's first block is A's, gathered)
    and give the tokens and log-probabilities of the first time."""
    rng = torch.Generator().manual_seed(7)
    system, a, b, c = (
        torch.randint(0, varied.config.vocab_size, (n,), generator=rng).tolist() for n in (16, 150, 150, 166)
    )
    engine = Engine(varied, max_batch=2)
    engine.generate([c, c[::-1]], [PARAMS, PARAMS])  # a cache of two slots, both used once
    first = [engine.generate([system + tail], [PARAMS])[0] for tail in (a, b)]
    hits = engine.scheduler.hits
    again = [engine.generate([system + tail], [PARAMS])[0] for tail in (a, b)]
    assert engine.scheduler.hits - hits == 2 * 160
    for x, y in zip(first, again):
        assert x.token_ids == y.token_ids
        assert [p.logprob for p in x.logprobs] == pytest.approx([p.logprob for p in y.logprobs], abs=1e-5)


def test_without_prefix_caching_nothing_is_looked_up_or_kept(varied):
    """`--no-prefix-caching`: the same prompt twice is computed twice, with the same tokens."""
    prompt = list(range(3, 60))
    engine = Engine(varied, prefix_caching=False)
    first, again = (engine.generate([prompt], [PARAMS])[0] for _ in range(2))
    assert engine.scheduler.hits == engine.scheduler.queried == 0 and not engine.scheduler.pool.cached
    assert again.token_ids == first.token_ids


def test_a_prompt_all_cached_still_computes_its_last_token(varied):
    """The same 32-token prompt twice: its last block is cached, but the last token is fed again for
    its logits (a hit of 16, not 32)."""
    prompt = list(range(3, 35))
    engine = Engine(varied)
    first = engine.generate([prompt], [PARAMS])[0]
    hits = engine.scheduler.hits
    again = engine.generate([prompt], [PARAMS])[0]
    assert engine.scheduler.hits - hits == 16 and again.token_ids == first.token_ids


def test_a_full_pool_makes_requests_wait_and_preempts_without_changing_tokens(varied):
    """Five sequences (one sampled with a seed, one with prompt log-probabilities) over 5 blocks where
    each needs 2 to 4: some wait, running ones are preempted and resumed, and every token and
    log-probability equals an unpressured run; when all is done every block is back."""
    rng = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, varied.config.vocab_size, (n,), generator=rng).tolist() for n in (5, 20, 9, 30, 14)]
    params = [PARAMS] * 3 + [
        SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, seed=3),
        SamplingParams(max_tokens=20, ignore_eos=True, prompt_logprobs=1),
    ]
    want = Engine(varied, max_batch=5).generate(prompts, params)
    engine = small_engine(varied, blocks=6)
    got = engine.generate(prompts, params)
    b = engine.scheduler
    assert b.preemptions > 0 and b.pool.used() == 0 and b.pool.available() == b.pool.capacity == 5
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and len(g.logprobs) == len(w.logprobs)
        assert [x.logprob for x in g.logprobs] == pytest.approx([x.logprob for x in w.logprobs], abs=1e-4)
    assert len(got[4].prompt_logprobs) == len(prompts[4])  # scored once, though preempted or not
    assert [x and x.logprob for x in got[4].prompt_logprobs] == pytest.approx(
        [x and x.logprob for x in want[4].prompt_logprobs], abs=1e-4
    )


def test_cancelled_and_finished_sequences_give_every_block_back(varied):
    """Blocks held mid-run are exactly those of the running sequences; after two are cancelled and one
    finishes, the pool holds nothing."""
    engine = small_engine(varied, blocks=10)
    engine.use(engine.runner.new_cache(3, 64), 3)
    scheduler = engine.scheduler
    seqs = [
        Sequence(list(range(1, 1 + n)), SamplingParams(max_tokens=30, ignore_eos=True), request=r)
        for n, r in ((20, "a"), (3, "b"), (40, "c"))
    ]
    for s in seqs:
        scheduler.add(s)
    for _ in range(4):
        engine.step()
    held = {b for s in scheduler.running for b in s.blocks}
    assert held and scheduler.pool.used() == len(held)
    scheduler.abort({"a", "c"})
    while scheduler.busy():
        engine.step()
    assert [s.finish_reason for s in seqs] == ["cancelled", "length", "cancelled"]
    assert scheduler.pool.used() == 0 and all(not s.blocks for s in seqs)


def test_a_request_larger_than_the_whole_cache_is_refused_with_the_numbers(varied):
    """A prompt plus max_tokens past the whole cache could never run: refused (400) naming the numbers."""
    engine = small_engine(varied, blocks=4)  # 3 blocks: 48 tokens
    engine.use(engine.runner.new_cache(2, 64), 2)
    scheduler = engine.scheduler
    with pytest.raises(
        ContextOverflow, match=r"needs 50 tokens of KV cache \(20 in the prompt, 30 in the completion\) "
    ):
        scheduler.add(Sequence(list(range(1, 21)), SamplingParams(max_tokens=30)))
    scheduler.add(Sequence(list(range(1, 21)), SamplingParams(max_tokens=28)))  # 48 fits
