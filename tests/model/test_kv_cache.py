"""The KV cache must not change the numbers: cached decode equals a full recompute, and a batch equals
its sequences run one by one."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from model.kv_cache import Batch, KVCache
from service.engine.sampling_params import SamplingParams


@pytest.fixture(params=["torch", "ours"])
def model(request, tiny, steps_in):
    """The tiny model with the step around its matmuls in torch's ops, then in our kernels."""
    with steps_in(tiny.engine.model, request.param) as model:
        yield model


def cache_of(model, blocks: int = 16, block_size: int = 4, region: int = 4) -> KVCache:
    cfg = model.config
    return KVCache(cfg.num_layers, blocks, block_size, region, cfg.num_kv_heads, cfg.head_dim)


@pytest.mark.parametrize("table", [[4, 5, 6], [3, 4, 5], [7, 2, 9]], ids=["home", "across-regions", "scattered"])
def test_cached_decode_equals_full_forward(model, table):
    """Guards cache writes at the right (block, offset), the `key_pos <= query_pos` mask, and both reads:
    a region's first positions (home) and a gather of blocks elsewhere; positions cross block boundaries;
    with our kernels, each decode row's keys visible up to its position."""
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
    positions = torch.arange(ids.shape[1])[None]
    cache, blocks = cache_of(model), torch.tensor([table])
    with torch.inference_mode():
        full = model(ids, positions)[0]
        steps = [model(ids[:, :5], positions[:, :5], cache, blocks)[0]]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], positions[:, t : t + 1], cache, blocks)[0])
    assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_by_one(model, tiny):
    """Guards ragged prefill padding and per-row positions in decode (each row's own length in ours)."""
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
    chunk, tiny.engine.config.step_tokens = tiny.engine.config.step_tokens, 16
    try:
        assert tiny.engine.generate([prompt], params)[0].token_ids == whole
    finally:
        tiny.engine.config.step_tokens = chunk


@pytest.mark.parametrize(
    "table,home",
    [([[9, 2, 6], [5, 11, 0]], None), ([[4, 5, 6], [8, 9, 0]], slice(1, 3)), ([[12, 13, 14], [4, 5, 0]], [3, 1])],
    ids=["scattered", "home-run", "home-apart"],
)
def test_ragged_rows_over_block_tables_equal_full_forwards(model, table, home):
    """Two rows of different lengths, over blocks scattered or at the start of their regions (read in
    place, as one run of regions or two apart), prefilled right-padded (the padding written to the null
    block) then decoded across block boundaries: each row equals its own full forward."""
    rows = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 50, 51, 52, 53, 54, 55]]
    cache = cache_of(model)
    blocks = torch.tensor(table)  # the second row's third entry: the null block
    positions = torch.tensor([[9], [6]])
    read = Batch.make(positions, cache, blocks).home
    assert read == home if not isinstance(read, torch.Tensor) else read.tolist() == home
    with torch.inference_mode():
        full = [model(torch.tensor([r]), torch.arange(len(r))[None])[0] for r in rows]
        ids = torch.tensor([rows[0][:5], rows[1][:3] + [0, 0]])
        positions = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 8, 9]])  # padding past the row's two blocks
        first = model(ids, positions, cache, blocks)
        assert_close(first[0], full[0][:5], atol=1e-5, rtol=1e-5)
        assert_close(first[1, :3], full[1][:3], atol=1e-5, rtol=1e-5)
        got = [[], []]
        for t in range(4):
            at = [5 + t, 3 + t]
            step = model(
                torch.tensor([[rows[0][at[0]]], [rows[1][at[1]]]]), torch.tensor([[at[0]], [at[1]]]), cache, blocks
            )
            for r in (0, 1):
                got[r].append(step[r, 0])
    assert_close(torch.stack(got[0]), full[0][5:9], atol=1e-5, rtol=1e-5)
    assert_close(torch.stack(got[1]), full[1][3:7], atol=1e-5, rtol=1e-5)


def test_a_cpu_pool_commits_memory_only_as_blocks_are_used(tiny):
    """A block is zeroed when a forward first names it, and only then: the pool is taken with `torch.empty`."""
    cache = cache_of(tiny.engine.model)
    assert cache.clean.tolist() == [True] + [False] * 15  # the null block
    with torch.inference_mode():
        tiny.engine.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache, torch.tensor([[9]]))
    assert cache.clean.nonzero().flatten().tolist() == [0, 9]
    assert cache.k.unflatten(3, (4, 4))[:, 2, :, 1].isfinite().all()  # block 9: region 2, offset 1


def test_bfloat16_model_runs_and_stays_close():
    """Guards dtype consistency (RoPE tables, KV cache) when weights are not fp32."""
    from model.loader import load_model
    from model.registry import resolve
    from service.engine.core import Engine

    path = resolve("tiny-random")
    fp32, bf16 = load_model(path), load_model(path, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    positions = torch.arange(5)[None]
    with torch.inference_mode():
        want, got = fp32(ids, positions), bf16(ids, positions).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    out = Engine(bf16).generate([ids[0].tolist()], [SamplingParams(max_tokens=8, ignore_eos=True)])
    assert len(out[0].token_ids) == 8


@pytest.fixture(scope="module", params=["int4", "fp32"])
def native_tiny(request):
    """tiny-random quantized int4, or fp32 on our fp32 kernel (its matmuls on our kernels either way), a
    random q/k/v bias added as Qwen2 has."""
    from model import kernels
    from model.cpu_matmul import pack
    from model.loader import load_model
    from model.registry import resolve

    model = load_model(resolve("tiny-random"), quantization="int4" if request.param == "int4" else "none")
    if request.param == "fp32" and kernels.load() is not None:
        pack(model, kernels.load(), min_bytes=0, force="ours")  # these tiny weights are timed only from 1 MB on
    if model.model.layers[0].native_weights is None:
        pytest.skip("our kernels did not load")
    g = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        qkv = block.self_attn.qkv_proj
        qkv.bias = torch.nn.Parameter(torch.randn(qkv.kernel.out_features, generator=g) * 0.1, requires_grad=False)
    return model


@pytest.mark.parametrize(
    "table", [[[4, 5, 6]], [[4, 5, 6], [8, 9, 0]], [[7, 2, 9]]], ids=["home", "home-run", "scattered"]
)
def test_a_block_in_one_call_gives_the_bits_of_its_ops(native_tiny, table, monkeypatch):
    """Prefill of 5 tokens, decode steps of 1 and a verify-like step of 3, each block as one call of ours
    (`nlg::block`, where the rows' keys sit in their home regions) or as its ops one by one: the same logits
    and the same cache contents, bit for bit, ragged rows included. A scattered table takes the ops."""
    from model.llama import Block

    calls = []
    one_call = Block.native_block
    monkeypatch.setattr(Block, "native_block", lambda self, *a: calls.append(1) or one_call(self, *a))
    rows, blocks = len(table), torch.tensor(table)
    ids = torch.randint(3, 250, (rows, 11), generator=torch.Generator().manual_seed(1))
    # (first position, tokens) of each step; a second row one position behind after the prefill (ragged)
    steps = [(0, 5), (5, 1), (6, 1), (7, 3), (10, 1)]

    def run(fused: bool) -> tuple[list[torch.Tensor], KVCache]:
        for block in native_tiny.model.layers:
            block.native_step = block.input_layernorm.native_step if fused else None
        cache, out = cache_of(native_tiny), []
        try:
            with torch.inference_mode():
                for first, n in steps:
                    lag = torch.tensor([[0], [1 if first else 0]])[:rows]
                    positions = torch.arange(first, first + n)[None] - lag
                    out.append(native_tiny(ids[:, first : first + n], positions, cache, blocks))
        finally:
            for block in native_tiny.model.layers:
                block.native_step = block.input_layernorm.native_step
        return out, cache

    ops, ops_cache = run(False)
    assert not calls
    fused, fused_cache = run(True)
    assert bool(calls) == (table != [[7, 2, 9]])
    assert all(torch.equal(a, b) for a, b in zip(ops, fused))
    written = ops_cache.clean.nonzero().flatten()  # the blocks named, zeroed, then written (the rest: garbage)
    for a, b in ((ops_cache.k, fused_cache.k), (ops_cache.v, fused_cache.v)):
        a, b = (c.unflatten(3, (4, 4))[:, written // 4, :, written % 4] for c in (a, b))
        assert torch.equal(a, b)
