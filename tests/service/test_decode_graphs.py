"""The static decode step that CUDA graphs replay (run eagerly here) must equal the ordinary decode."""

from __future__ import annotations

from torch.testing import assert_close

from service.decode_graphs import GraphDecoder
from service.engine import Batcher, Engine, Sequence
from service.sampling import SamplingParams


def test_static_step_equals_decode_with_empty_rows(tiny):
    """Sequences in slots 0 and 2 of 4: the bucket holds an empty row between them and one after."""
    engine = Engine(tiny.engine.model, graphs=False)
    cache = engine.new_cache(4, 64)
    seqs = [Sequence(tiny.tokenizer.encode(t), SamplingParams()) for t in ("first prompt", "the second one")]
    for s, slot in zip(seqs, (0, 2)):
        s.slot = slot
    for s, row in engine.prefill([(s, len(s.prompt)) for s in seqs], cache):
        s.output.append(int(row.argmax()))
    decoder = GraphDecoder(engine.model, cache, capture=False)
    assert decoder.bucket(seqs) == (4, 256) and decoder.rows == [1, 2, 4]
    for _ in range(5):
        want = engine.decode(seqs, cache)
        got = decoder(seqs)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        for s, row in zip(seqs, want):
            s.output.append(int(row.argmax()))


def test_generation_through_static_decode_equals_eager(tiny):
    """Continuous batching through the static path: slots free and refill while others run, and two
    sequences fill the cache to its last position but one (the position empty rows write to)."""
    prompts = [tiny.tokenizer.encode(t) for t in ("a", "a longer prompt here", "mid length", "z" * 40, "q")]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 20, 9, 24, 30)]
    eager = Engine(tiny.engine.model, max_batch=3, graphs=False)
    static = Engine(tiny.engine.model, max_batch=3, graphs=True)
    want = [c.token_ids for c in eager.generate(prompts, params)]
    assert [c.token_ids for c in static.generate(prompts, params)] == want
    assert static.graphs is not None and static.graphs.capture is False

    full = [tiny.tokenizer.encode("fill " * 20), tiny.tokenizer.encode("up")]
    cache = static.new_cache(2, 1)  # 256 positions
    out = []
    for engine in (eager, static):
        batcher = Batcher(engine, cache)
        seqs = [Sequence(p, SamplingParams(max_tokens=256 - len(p), ignore_eos=True)) for p in full]
        for s in seqs:
            batcher.add(s)
        while batcher.busy():
            batcher.step()
        out.append([s.output for s in seqs])
    assert out[0] == out[1] and len(out[0][1]) == 256 - len(full[1])


def test_buckets_grow_with_slots_and_length(tiny):
    engine = Engine(tiny.engine.model, graphs=False)
    cache = engine.new_cache(40, 1000)  # 1024 positions
    decoder = GraphDecoder(engine.model, cache, capture=False)
    assert decoder.rows == [1, 2, 4, 8, 16, 32, 40]
    s = Sequence([1] * 300, SamplingParams())
    s.slot = 9
    assert decoder.bucket([s]) == (16, 512)
    s.slot, s.prompt = 39, [1] * 1000
    assert decoder.bucket([s]) == (40, 1024)
