"""The KV cache must not change the numbers: cached decode equals a full recompute, and a batch equals
its sequences run one by one."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from model.kv_cache import KVCache
from service.engine.sampling import SamplingParams


def test_cached_decode_equals_full_forward(tiny):
    """Guards cache writes at the right (slot, position) and the `key_pos <= query_pos` mask."""
    model = tiny.engine.model
    cfg = model.config
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
    positions = torch.arange(ids.shape[1])[None]
    cache = KVCache(cfg.num_layers, 3, 64, cfg.num_kv_heads, cfg.head_dim)
    slot = torch.tensor([2])  # not slot 0: exercises the gather path
    with torch.inference_mode():
        full = model(ids, positions)[0]
        steps = [model(ids[:, :5], positions[:, :5], cache, slot)[0]]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], positions[:, t : t + 1], cache, slot)[0])
    assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_by_one(tiny):
    """Guards ragged prefill padding and per-row positions in decode."""
    prompts = [tiny.tokenizer.encode(t) for t in ("hello there", "a much longer prompt than the first", "x")]
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * 3
    together = tiny.engine.generate(prompts, params)
    alone = [tiny.engine.generate([p], params[:1])[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_chunked_prefill_equals_single_chunk(tiny):
    """A long prompt split into prefill chunks gives the same tokens as one chunk."""
    prompt = tiny.tokenizer.encode("chunk me " * 30)
    params = [SamplingParams(max_tokens=8, ignore_eos=True)]
    whole = tiny.engine.generate([prompt], params)[0].token_ids
    chunk, tiny.engine.prefill_chunk = tiny.engine.prefill_chunk, 16
    try:
        assert tiny.engine.generate([prompt], params)[0].token_ids == whole
    finally:
        tiny.engine.prefill_chunk = chunk


def test_scattered_slots_read_through_a_gather(tiny):
    """Rows in slots (2, 0): not one run, so attention gathers the rows; results equal a full forward."""
    model = tiny.engine.model
    cfg = model.config
    ids = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])
    positions = torch.arange(6).expand(2, 6)
    cache = KVCache(cfg.num_layers, 3, 64, cfg.num_kv_heads, cfg.head_dim)
    slots = torch.tensor([2, 0])
    with torch.inference_mode():
        full = model(ids, positions)
        model(ids[:, :4], positions[:, :4], cache, slots)
        step = [model(ids[:, t : t + 1], positions[:, t : t + 1], cache, slots) for t in (4, 5)]
    assert_close(torch.cat(step, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_bfloat16_model_runs_and_stays_close():
    """Guards dtype consistency (RoPE tables, KV cache) when weights are not fp32."""
    from model.loader import load_model
    from model.registry import resolve
    from service.engine.runner import Engine

    path = resolve("tiny-random")
    fp32, bf16 = load_model(path), load_model(path, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    positions = torch.arange(5)[None]
    with torch.inference_mode():
        want, got = fp32(ids, positions), bf16(ids, positions).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    out = Engine(bf16).generate([ids[0].tolist()], [SamplingParams(max_tokens=8, ignore_eos=True)])
    assert len(out[0].token_ids) == 8
