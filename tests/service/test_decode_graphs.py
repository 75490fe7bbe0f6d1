"""The static decode step that CUDA graphs replay (run eagerly here) must equal the ordinary decode."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from service.engine.blocks import BlockPool
from service.engine.core import Engine
from service.engine.cuda_graphs import GraphDecoder, decode_step
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence


def hold(pool: BlockPool, seqs: list[Sequence], tokens: int) -> None:
    """Give each sequence the blocks of its first `tokens` positions, as the scheduler does."""
    for s in seqs:
        s.blocks = [pool.take() for _ in range(-(-tokens // pool.size))]


def test_static_step_equals_decode_with_empty_rows(tiny):
    """Sequences in slots 0 and 2 of 4: the bucket holds an empty row between them and one after."""
    engine = Engine(tiny.engine.model, graphs=False)
    cache = engine.runner.new_cache(4, 64)
    seqs = [Sequence(tiny.tokenizer.encode(t), SamplingParams()) for t in ("first prompt", "the second one")]
    hold(BlockPool(cache.num_blocks, cache.block_size, cache.region, 4), seqs, 32)
    for s, slot in zip(seqs, (0, 2)):
        s.slot = slot
    for s, row in engine.runner.prefill([(s, len(s.prompt)) for s in seqs], cache)[0]:
        s.output.append(int(row.argmax()))
    decoder = GraphDecoder(engine.model, cache, engine.runner.width, capture=False)
    assert decoder.bucket(seqs) == (4, 256) and decoder.buckets(4) == [1, 2, 4]
    for _ in range(5):
        want = engine.runner.decode(seqs, cache)
        logits, tokens = decoder(seqs)
        assert_close(logits[[0, 2]], want, atol=1e-5, rtol=1e-5)
        assert tokens.tolist() == logits.argmax(-1).tolist()
        ids, positions = decoder.inputs[4][0][:, :, 0]  # the next step's inputs: each row's token, one further
        assert ids.tolist() == tokens.tolist()
        assert positions.tolist() == [seqs[0].length, 1, seqs[1].length, 1]  # empty rows: null block, position 0
        for s, row in zip(seqs, want):
            s.output.append(int(row.argmax()))


def test_chained_steps_equal_steps_fed_by_the_host(varied):
    """A chained step reads the tokens the step before wrote into the inputs: the same logits as feeding
    each sequence's last token from the host."""
    engine = Engine(varied, graphs=False)
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5]]
    logits = {}
    for chained in (False, True):
        cache = engine.runner.new_cache(2, 64)
        seqs = [Sequence(p, SamplingParams()) for p in prompts]
        hold(BlockPool(cache.num_blocks, cache.block_size, cache.region, 4), seqs, 32)
        for slot, s in enumerate(seqs):
            s.slot = slot
        for s, row in engine.runner.prefill([(s, len(s.prompt)) for s in seqs], cache)[0]:
            s.output.append(int(row.argmax()))
        decoder = GraphDecoder(engine.model, cache, engine.runner.width, capture=False)
        logits[chained] = []
        for i in range(6):
            out, tokens = decoder(seqs, chained=chained and i > 0)
            logits[chained].append(out)
            for s, t in zip(seqs, tokens.tolist()):
                s.output.append(t)
    for a, b in zip(logits[False], logits[True]):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generation_through_static_decode_equals_eager(tiny, varied):
    """Continuous batching through the static path: slots free and refill while others run, and two
    sequences fill their tables to the last position."""
    prompts = [tiny.tokenizer.encode(t) for t in ("a", "a longer prompt here", "mid length", "z" * 40, "q")]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 20, 9, 24, 30)]
    eager = Engine(varied, max_batch=3, graphs=False)
    static = Engine(varied, max_batch=3, graphs=True)
    want = [c.token_ids for c in eager.generate(prompts, params)]
    assert [c.token_ids for c in static.generate(prompts, params)] == want
    assert static.runner.graphs is not None and static.runner.graphs.capture is False

    full = [tiny.tokenizer.encode("fill " * 20), tiny.tokenizer.encode("up")]
    out = []
    for graphs in (False, True):
        engine = Engine(varied, graphs=graphs, context=256)
        engine.use(engine.runner.new_cache(2, 256), 2)
        seqs = [Sequence(p, SamplingParams(max_tokens=256 - len(p), ignore_eos=True)) for p in full]
        engine.run(seqs)
        out.append([s.output for s in seqs])
    assert out[0] == out[1] and len(out[0][1]) == 256 - len(full[1])


def test_buckets_grow_with_slots_and_length(tiny):
    """Graph buckets cover the highest slot and the longest sequence, up to a whole table."""
    engine = Engine(tiny.engine.model, graphs=False, context=1000)  # tables of 63 blocks: 1008 positions
    decoder = GraphDecoder(engine.model, engine.runner.new_cache(40, 1000), engine.runner.width, capture=False)
    assert decoder.buckets(40) == [1, 2, 4, 8, 16, 32, 64]
    s = Sequence([1] * 300, SamplingParams())
    s.slot = 9
    assert decoder.bucket([s]) == (16, 512)
    s.slot, s.prompt = 39, [1] * 1000
    assert decoder.bucket([s]) == (64, 1008)


def test_steps_launched_ahead_stop_where_the_host_says(varied):
    """Greedy steps chained ahead of the host: a sequence stopped by its callback, a stop token or its
    budget gets no token past the stop, and the tokens equal the eager path's; a sampled sequence in
    the batch (the longest) turns chaining off and changes nothing either."""
    prompts = torch.randint(0, varied.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0)).tolist()
    eager = Engine(varied, max_batch=4, graphs=False)
    free = eager.generate(prompts[1:2], [SamplingParams(max_tokens=12, ignore_eos=True)])[0].token_ids
    stop = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i])
    params = [
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(stop,)),
        SamplingParams(max_tokens=15, ignore_eos=True),
        SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=3),
    ]
    stop_after = {0: 4}

    def run(engine, n):
        seen = {i: [] for i in range(n)}

        def on_token(i, t):
            seen[i].append(t)
            return len(seen[i]) == stop_after.get(i)

        out = engine.generate(prompts[:n], params[:n], on_token=on_token)
        return [(c.token_ids, c.finish_reason) for c in out], seen

    ahead = Engine(varied, max_batch=4, graphs=True)
    chained = []
    launch = ahead.runner.launch

    def counted(seqs, cache, **kw):
        chained.append(kw.get("chained", False))
        return launch(seqs, cache, **kw)

    ahead.runner.launch = counted
    for n in (3, 4):
        chained.clear()
        want, _ = run(eager, n)
        got, seen = run(ahead, n)
        assert got == want
        assert [seen[i] for i in range(n)] == [ids for ids, _ in got]  # no token delivered past a stop
        assert [reason for _, reason in got[:3]] == ["stop", "stop", "length"]
        assert len(got[0][0]) == 4 and got[1][0] == free[: free.index(stop)]
        assert any(chained) == (n == 3)


def test_warm_up_covers_every_row_bucket_and_changes_no_result(varied):
    """Warm-up records every (rows, span) bucket so no request waits for a capture, and generation after it equals
    the eager path."""
    prompts = torch.randint(0, varied.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1)).tolist()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 9, 7)]
    want = [c.token_ids for c in Engine(varied, max_batch=4, graphs=False).generate(prompts, params)]
    static = Engine(varied, max_batch=4, graphs=True, context=512)
    cache = static.runner.new_cache(4, 300)
    assert static.runner.warm_up(cache, 4) == [(1, 256), (2, 256), (4, 256), (1, 512), (2, 512), (4, 512)]
    assert Engine(varied).runner.warm_up(cache, 4) == []  # off the graph path: nothing to warm up
    static.use(cache, 4)
    seqs = [Sequence(p, sp) for p, sp in zip(prompts, params)]
    static.run(seqs)
    assert [s.output for s in seqs] == want


def test_chained_steps_cross_into_a_longer_span(varied, monkeypatch):
    """A sequence that passes position 256 while its steps are chained moves to the 512-key bucket,
    which reads the same input buffers."""
    prompt = torch.randint(0, varied.config.vocab_size, (250,), generator=torch.Generator().manual_seed(3)).tolist()
    params = [SamplingParams(max_tokens=20, ignore_eos=True)]
    want = Engine(varied, graphs=False).generate([prompt], params)[0].token_ids
    buckets = []

    def spy(model, inputs, tables, cache, span):
        buckets.append(span)
        return decode_step(model, inputs, tables, cache, span)

    monkeypatch.setattr("service.engine.cuda_graphs.decode_step", spy)
    assert Engine(varied, graphs=True).generate([prompt], params)[0].token_ids == want
    assert buckets.count(256) == 6 and buckets.count(512) == 13  # positions 250-255, then 256-268


def test_cancelled_while_a_step_is_launched_ahead(varied):
    """A sequence cancelled while its next token is on the way drops that token; the others go on."""
    prompts = torch.randint(0, varied.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2)).tolist()
    out = []
    for graphs in (False, True):
        engine = Engine(varied, max_batch=2, graphs=graphs)
        engine.use(engine.runner.new_cache(2, 64), 2)
        scheduler = engine.scheduler
        seqs = [Sequence(p, SamplingParams(max_tokens=12, ignore_eos=True), request=r) for p, r in zip(prompts, "ab")]
        for s in seqs:
            scheduler.add(s)
        while scheduler.busy():
            if len(seqs[0].output) >= 3:
                scheduler.abort({"a"})
            engine.step()
        assert scheduler.ahead is None  # no step is launched past the last token of a budget
        out.append([(s.output, s.finish_reason) for s in seqs])
    assert out[0] == out[1]
    assert out[1][0][1] == "cancelled" and len(out[1][0][0]) == 3 and len(out[1][1][0]) == 12


@pytest.mark.heavy
def test_compiled_warm_up_meets_every_shape_then_equals_eager(varied):
    """`--compile` (Inductor's CPU backend here: the same tracing, input and cache updates, and guards as
    on CUDA): warm-up meets every shape the compiler specializes on, so no later bucket waits for a
    compile, and generation through the compiled steps, launched ahead, gives the eager path's tokens."""
    from torch._dynamo.utils import counters

    engine = Engine(varied, max_batch=2, graphs=True, compile=True, context=1024)
    cache = engine.runner.new_cache(2, 1000)
    before = counters["stats"]["unique_graphs"]
    assert len(engine.runner.warm_up(cache, 2)) == 6  # rows 1, 2 x spans 256, 512, 1024
    compiled = counters["stats"]["unique_graphs"]
    assert compiled - before == 5  # the 6 buckets need 5 graphs: one is shared
    for rows, length in [(2, 700), (1, 1024), (2, 300), (1, 1000)]:
        engine.runner.graphs([Sequence([0] * (length - 1), SamplingParams(), slot=rows - 1, output=[0])])
    assert counters["stats"]["unique_graphs"] == compiled

    prompts = torch.randint(0, varied.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4)).tolist()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (10, 14)]
    want = [c.token_ids for c in Engine(varied, graphs=False).generate(prompts, params)]
    engine.use(cache, 2)
    seqs = [Sequence(p, sp) for p, sp in zip(prompts, params)]
    engine.run(seqs)
    assert [seq.output for seq in seqs] == want


def test_concurrent_requests_launched_ahead_equal_each_alone(varied):
    """The engine's thread over the graph path: 24 requests from 8 threads, greedy (launched ahead)
    and sampled mixed in 3 slots, some stopped by their callback, each equal to running it alone."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    jobs = []
    for i in range(24):
        prompt = [rng.randrange(varied.config.vocab_size) for _ in range(rng.randrange(1, 30))]
        temperature = 0.0 if rng.random() < 0.7 else 0.9
        params = SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=True, temperature=temperature, seed=i)
        jobs.append((prompt, params, rng.randrange(1, 30) if rng.random() < 0.3 else None))

    def one(generate, job):
        prompt, params, stop_after = job
        seen = []

        def on_token(i, token):
            seen.append(token)
            return len(seen) == stop_after

        c = generate([prompt], [params], on_token)[0]
        assert seen == c.token_ids
        return c.token_ids, c.finish_reason

    eager = Engine(varied, graphs=False)
    alone = [one(eager.generate, job) for job in jobs]
    ahead = Engine(varied, max_batch=3, graphs=True)
    ahead.start(slots=3)
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda job: one(ahead.generate, job), jobs))
    finally:
        ahead.stop()
    assert together == alone
