"""Tensor-parallel layers (Megatron pattern).

Each layer knows its shard shape when it is built, reads only its own slice of a checkpoint
tensor (`shard`), and runs its own collective inside `forward`. At world size 1 they are the plain
layers: every collective returns early.

`shard(name, get)` returns this rank's piece of parameter `name`; `get(part)` opens a safetensors slice
(lazy, indexable) of the *full* checkpoint tensor: this layer's own key for part None, or the same
parameter of a sibling layer (`get("k_proj")`) for merged layers. `conv1d=True`
means the checkpoint stores the weight as (in, out), GPT-2's Conv1D layout: we slice the other
dimension and transpose, so every layer computes `x @ weight.T` with weight (out, in).

Vocabulary padding (vocab V, tp ranks, per = ceil(V / tp)):

    rank 0: rows [0, per)        rank 1: rows [per, 2*per)  ...  last rank: [.., V) + zero rows
    padded rows are never looked up (embedding) and are sliced off after the gather (head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.comm import gather_from_tensor_parallel_region, reduce_from_tensor_parallel_region
from parallel.state import get_tp

Ranges = list[tuple[int, int]]


def even_split(total: int, what: str) -> Ranges:
    """This rank's contiguous 1/tp share of `total` rows or columns."""
    tp = get_tp()
    if total % tp.size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor-parallel size {tp.size}")
    per = total // tp.size
    return [(tp.rank * per, (tp.rank + 1) * per)]


def head_split(total_heads: int, head_dim: int, offset: int = 0, what: str = "heads") -> Ranges:
    """Rows of this rank's heads. When tp > total_heads each rank keeps one replicated head
    (GQA key/value heads); that needs tp % total_heads == 0."""
    tp = get_tp()
    if tp.size <= total_heads:
        if total_heads % tp.size:
            raise ValueError(f"{what} ({total_heads}) not divisible by tensor-parallel size {tp.size}")
        per = total_heads // tp.size
        first = tp.rank * per
    else:
        if tp.size % total_heads:
            raise ValueError(f"tensor-parallel size {tp.size} is not a multiple of {what} ({total_heads})")
        per, first = 1, tp.rank // (tp.size // total_heads)
    return [(offset + first * head_dim, offset + (first + per) * head_dim)]


def _take(t, ranges: Ranges, dim: int) -> torch.Tensor:
    parts = [t[a:b] if dim == 0 else t[:, a:b] for a, b in ranges]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def _shape(t) -> list[int]:
    """The shape of a safetensors slice (lazy) or of a tensor."""
    return list(t.get_shape()) if hasattr(t, "get_shape") else list(t.shape)


def _empty(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ layer's weight.T (+ bias): the fp weight, or the `kernel` that replaced it: a quantized weight
    (`parallel.stored.quantize`) or a CPU-packed one (`model.cpu_matmul.pack`)."""
    if hasattr(layer, "kernel"):
        y = layer.kernel(x)
        return y + bias if bias is not None else y
    return F.linear(x, layer.weight, bias)


class ColumnParallelLinear(nn.Module):
    """Weight split on output rows; the output stays split (no collective after it).

    `parts` lists where this rank's rows come from, in order: (checkpoint sibling name, row ranges);
    name None is this layer's own key. A merged layer (`qkv_proj` from `q_proj`, `k_proj`, `v_proj`;
    `gate_up_proj` from `gate_proj`, `up_proj`) is one matmul whose pieces each keep their own split.
    """

    quantizable = True  # parallel.stored may replace the weight by an int8 or int4 one (`kernel`)

    def __init__(
        self,
        in_features: int,
        out_features: int = 0,
        bias: bool = False,
        conv1d: bool = False,
        parts: list[tuple[str | None, Ranges]] | None = None,
    ):
        super().__init__()
        self.parts = parts if parts is not None else [(None, even_split(out_features, "output features"))]
        self.conv1d = conv1d
        local_out = sum(b - a for _, ranges in self.parts for a, b in ranges)
        self.weight = _empty(local_out, in_features)
        self.bias = _empty(local_out) if bias else None

    def shard(self, name: str, get) -> torch.Tensor:
        dim = 1 if self.conv1d and name == "weight" else 0
        out = torch.cat([_take(get(part), ranges, dim) for part, ranges in self.parts], dim=dim)
        return out.t().contiguous() if dim == 1 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x, self.bias)


def qkv_parallel_linear(
    hidden: int,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    bias: bool,
    separate: bool = False,
    conv1d: bool = False,
) -> ColumnParallelLinear:
    """One [q | k | v] projection, each of q, k, v split by heads on its own (cutting a fused tensor in
    one contiguous piece would hand rank 0 all of q and none of v). Reads a fused checkpoint tensor
    (GPT-2 `c_attn`), or with `separate` the sibling q_proj, k_proj and v_proj, stacked. Quantized on our
    kernel, its activations keep ~15 bits instead of 8 (`precise_inputs`): measured on SmolLM2 Q4_1, int8
    rounding there alone moved WikiText perplexity +0.43%, and +0.62% with every layer's rounded."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    q_rows = head_split(num_heads, head_dim, what="attention heads")
    if not separate:
        k_rows = head_split(num_kv_heads, head_dim, q, "key/value heads")
        v_rows = head_split(num_kv_heads, head_dim, q + kv, "key/value heads")
        parts = [(None, q_rows + k_rows + v_rows)]
    else:
        kv_rows = head_split(num_kv_heads, head_dim, what="key/value heads")
        parts = [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)]
    layer = ColumnParallelLinear(hidden, bias=bias, conv1d=conv1d, parts=parts)
    layer.precise_inputs = True
    return layer


def merged_column_parallel_linear(in_features: int, out_features: int, names: list[str]) -> ColumnParallelLinear:
    """Several same-sized projections of one input (gate and up) as one matmul, each split evenly."""
    rows = even_split(out_features, "output features")
    return ColumnParallelLinear(in_features, parts=[(n, rows) for n in names])


class RowParallelLinear(nn.Module):
    """Weight split on input columns; partial outputs are all-reduced, then the bias added once."""

    quantizable = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, conv1d: bool = False):
        super().__init__()
        self.in_features = in_features
        self.ranges = even_split(in_features, "input features")
        self.conv1d = conv1d
        self.weight = _empty(out_features, self.ranges[0][1] - self.ranges[0][0])
        self.bias = _empty(out_features) if bias else None

    def shard(self, name: str, get) -> torch.Tensor:
        """This rank's columns of a weight, or of a stored quantized form of it (`model.gguf_quant`),
        whose columns may each stand for several input features (packed int4, group scales)."""
        t = get(None)
        if name == "bias":
            return t[:]
        if self.conv1d:
            return _take(t, self.ranges, 0).t().contiguous()
        per = self.in_features // _shape(t)[1]
        (a, b) = self.ranges[0]
        if a % per:
            raise ValueError(f"{name}: this rank's input features {a}..{b} do not fall on the stored groups of {per}")
        return _take(t, [(a // per, b // per)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel_region(_linear(self, x))
        return y + self.bias if self.bias is not None else y


class _VocabParallel(nn.Module):
    """Shared sharding of the vocabulary rows for the embedding and the LM head."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        tp = get_tp()
        self.vocab_size = vocab_size
        self.per_rank = math.ceil(vocab_size / tp.size)
        self.start = tp.rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = _empty(self.per_rank, hidden)

    def shard(self, name: str, get) -> torch.Tensor:
        t = get(None)
        rows = t[self.start : self.end] if self.end > self.start else None
        if rows is not None and rows.shape[0] == self.per_rank:  # no padding rows: no second copy
            return rows
        out = torch.zeros(self.per_rank, *_shape(t)[1:], dtype=rows.dtype if rows is not None else torch.float32)
        if rows is not None:
            out[: rows.shape[0]] = rows
        return out


class VocabParallelEmbedding(_VocabParallel):
    """Rows of the fp weight, or of quantized rows (`parallel.stored.QuantRows`) dequantized on lookup."""

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids) if hasattr(self, "rows") else F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tp().size == 1:
            return self._rows(ids)
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        x = self._rows(local).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(x)


class ParallelLMHead(_VocabParallel):
    """Logits over the vocabulary; each rank computes its rows, then they are gathered."""

    quantizable = "int8"  # at most int8, whatever --quantize asks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = gather_from_tensor_parallel_region(_linear(self, x))
        return logits[..., : self.vocab_size]
