"""Tensor-parallel layers simulated in one process: build each rank's shard of a layer, compute its
partial output with plain matmuls, combine (concat for column/head, sum for row/embedding) and
compare with the unsplit layer. Guards the shard arithmetic the multi-process runs rely on."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_column_parallel_linear,
    qkv_parallel_linear,
)
from parallel.state import get_tp, set_tp


@contextmanager
def rank(r: int, size: int):
    before = get_tp()
    set_tp(r, size)
    try:
        yield
    finally:
        set_tp(before.rank, before.size, before.group)


def loaded(build, tensors: dict[str, torch.Tensor], own: str):
    """Build a layer on the meta device and fill it from `tensors` (checkpoint keys: own or sibling)."""
    with torch.device("meta"):
        layer = build()
    for name, _ in list(layer.named_parameters()):
        value = layer.shard(name, lambda part, name=name: tensors[f"{part or own}.{name}"])
        setattr(layer, name, torch.nn.Parameter(value, requires_grad=False))
    return layer


x = torch.randn(3, 5, 32)  # (B, T, hidden): batch > 1 on purpose


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("conv1d", [False, True])
def test_column_then_row_equals_full_mlp(tp, conv1d):
    """Megatron's MLP split: column-parallel up, row-parallel down, summed partials plus one bias equal the full
    MLP (nn.Linear and GPT-2's Conv1D layouts)."""
    up, down, b = torch.randn(64, 32), torch.randn(32, 64), torch.randn(32)
    ckpt = {"up.weight": up.t() if conv1d else up, "down.weight": down.t() if conv1d else down, "down.bias": b}
    partials = []
    for r in range(tp):
        with rank(r, tp):
            col = loaded(lambda: ColumnParallelLinear(32, 64, conv1d=conv1d), ckpt, "up")
            row = loaded(lambda: RowParallelLinear(64, 32, bias=True, conv1d=conv1d), ckpt, "down")
        partials.append(F.linear(F.gelu(col(x)), row.weight))  # before the all-reduce
    assert_close(sum(partials) + row.bias, F.linear(F.gelu(F.linear(x, up)), down, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads, kv_heads, tp", [(8, 2, 2), (8, 2, 4), (8, 8, 4), (4, 2, 4)])
def test_qkv_shards_hold_each_ranks_heads(heads, kv_heads, tp):
    """q, k and v are each split by heads; with tp > kv_heads a rank keeps the kv head its q heads use.
    Covers the fused GPT-2 tensor and the separate Llama q/k/v tensors."""
    d = 4
    q, k, v = torch.randn(heads * d, 32), torch.randn(kv_heads * d, 32), torch.randn(kv_heads * d, 32)
    fused = {"c_attn.weight": torch.cat([q, k, v]).t(), "c_attn.bias": torch.zeros((heads + 2 * kv_heads) * d)}
    separate = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v}
    group = heads // kv_heads
    for r in range(tp):
        with rank(r, tp):
            a = loaded(lambda: qkv_parallel_linear(32, d, heads, kv_heads, True, conv1d=True), fused, "c_attn")
            b = loaded(lambda: qkv_parallel_linear(32, d, heads, kv_heads, False, separate=True), separate, "qkv")
        local = heads // tp
        first_q = r * local
        want_q = q[first_q * d : (first_q + local) * d]
        kv_first = first_q // group
        kv_local = max(1, kv_heads // tp)
        want_kv = slice(kv_first * d, (kv_first + kv_local) * d)
        want = torch.cat([want_q, k[want_kv], v[want_kv]])
        assert_close(a.weight, want)
        assert_close(b.weight, want)


def test_merged_gate_up_splits_each_part():
    """A merged gate/up projection must shard gate and up separately; splitting the concatenation gives rank 1 only
    up rows."""
    gate, up = torch.randn(16, 8), torch.randn(16, 8)
    with rank(1, 2):
        layer = loaded(
            lambda: merged_column_parallel_linear(8, 16, ["gate_proj", "up_proj"]),
            {"gate_proj.weight": gate, "up_proj.weight": up},
            "gate_up_proj",
        )
    assert_close(layer.weight, torch.cat([gate[8:], up[8:]]))


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding_and_head_with_padding(tp):
    """vocab 259 does not divide by 2 or 4: padded rows must never be looked up nor leak as logits."""
    vocab, hidden = 259, 16
    w = torch.randn(vocab, hidden)
    ids = torch.tensor([[0, 1, 130, 258], [64, 65, 200, 3]])
    h = torch.randn(2, 4, hidden)
    embeds, logits = [], []
    for r in range(tp):
        with rank(r, tp):
            emb = loaded(lambda: VocabParallelEmbedding(vocab, hidden), {"e.weight": w}, "e")
            head = loaded(lambda: ParallelLMHead(vocab, hidden), {"e.weight": w}, "e")
        inside = (ids >= emb.start) & (ids < emb.start + emb.per_rank)
        local = F.embedding((ids - emb.start).clamp(0, emb.per_rank - 1), emb.weight)
        embeds.append(local * inside.unsqueeze(-1))
        logits.append(F.linear(h, head.weight))
    assert_close(sum(embeds), F.embedding(ids, w))
    assert_close(torch.cat(logits, -1)[..., :vocab], F.linear(h, w))


@pytest.mark.parametrize(
    "heads, kv_heads, tp, message",
    [
        (9, 3, 4, r"attention heads \(9\) not divisible by tensor-parallel size 4"),
        (6, 3, 2, r"key/value heads \(3\) not divisible by tensor-parallel size 2"),
        (12, 4, 6, r"tensor-parallel size 6 is not a multiple of key/value heads \(4\)"),
    ],
)
def test_impossible_split_says_why(heads, kv_heads, tp, message):
    """A head count the TP size cannot split is refused with the reason, not an index error at load."""
    with rank(0, tp), pytest.raises(ValueError, match=message):
        qkv_parallel_linear(heads * 4, 4, heads, kv_heads, False, separate=True)
