"""fp32 linear layers on a CPU through oneDNN's or our own kernel with prepacked weights, where that
measures faster.

`F.linear` calls MKL's sgemm, which on a 2-core AVX2 EPYC read SmolLM2's decode-step weights at ~13
GB/s of the ~29 GB/s the machine reads, and took 2x longer for 2 to 16 rows than for one. oneDNN's
matmul with the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`) read
them at ~24 GB/s, and 8 rows cost 1.6x one (measured over all 121 matmuls of a step: 41 against 22 ms
for one row, 85 against 35 ms for eight; a 512-row prefill chunk the same). Which is faster depends on
the CPU (MKL on Intel) and on the shape (oneDNN's call costs ~25 us more, which loses on tiny weights),
so `pack` measures both at load, per weight shape, and keeps the faster. Where our kernels are built
(`model.kernels`), a third route is timed beside them: `DenseLinear`, our fp32 kernel (`nlg::dense`) on its
own packed copy of the weight. One Zen 4 core, GB/s of weights from memory over SmolLM2's and the 1.5B
model's shapes: one row 17-23 against oneDNN's 11-14 and MKL's 10-19, 8 rows 15-21 against 11-13 and 5-8;
64 and 512 rows as oneDNN (75-110 GFLOP/s). Routes are timed at 1, 8 and 64 rows (decode, a batch, a
prefill chunk), each row count weighed alike.

The packed weight is a copy (oneDNN's an opaque tensor): a layer that takes it drops its own weight (a head
tied to the input embedding drops only its reference: the embedding keeps the tensor for lookups). bf16
packing needs AVX-512 or AVX-NE-CONVERT; where the CPU lacks them, and for quantized layers, nothing is
packed.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from model.heap import trim

ROWS_HINT = 64  # the batch size oneDNN's layout is chosen for: any hint above 1 gave the same blocked
# layout speed for 1 to 512 rows; a hint of 1 gave a layout 1.4x slower at one row and 2x at eight
MIN_BYTES = 1 << 20  # smaller weights stay with F.linear: oneDNN's call overhead outweighs the read (and
# the test model's largest weight, 256 KB, never takes a route that timing noise could flip)
SAMPLE_BYTES = 64 << 20  # weights of one shape timed, at most (twice the L3 cache of the EPYC measured)
MARGIN = 0.9  # oneDNN or ours is kept only when it takes under 90% of F.linear's time (noise must not flip it)
ROWS = (1, 8, 64)  # the row counts routes are timed at


class PackedLinear(nn.Module):
    """x @ weight.T through oneDNN, the weight reordered once."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.nbytes = weight.shape[0], weight.numel() * weight.element_size()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def __deepcopy__(self, memo) -> PackedLinear:
        """A copy of the packed weight (an opaque tensor has no storage for `copy.deepcopy` to copy)."""
        new = copy.copy(self)
        new.__dict__ = copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "packed"}, memo)
        new.packed = self.packed.clone()
        return new


class DenseLinear(nn.Module):
    """x @ weight.T through our kernel (`nlg::dense` with instruction set `isa`), the weight packed once into
    `tiles`; as the quantized kernels, a block of them runs as one call (`model.llama.Block.native_weights`)."""

    precise = False  # (the quantized kernels' activation mode; fp32 activations are not rounded)

    def __init__(self, weight: torch.Tensor, isa: str):
        super().__init__()
        self.out_features, self.nbytes, self.isa = weight.shape[0], weight.numel() * weight.element_size(), isa
        self.tiles = torch.ops.nlg.pack_dense(weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch.ops.nlg.dense(flat, self.tiles, self.out_features, self.isa).view(*x.shape[:-1], -1)


def _packable(layer: nn.Module, min_bytes: int) -> bool:
    w = layer._parameters.get("weight")
    if not getattr(layer, "quantizable", False) or hasattr(layer, "kernel") or w is None:
        return False
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() * 4 >= min_bytes


def _seconds(fns: list, x: torch.Tensor, rounds: int = 3) -> float:
    """Best of `rounds` of every function in turn on `x` (the weights read from memory, as in a step)."""
    for fn in fns[:2]:
        fn(x)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for fn in fns:
            fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def _route(weights: list[torch.Tensor], isa: str | None) -> str:
    """ "onednn", "ours" (where `isa` names our kernels' instruction set) or "mkl" (`F.linear`): the fastest
    over `weights` in turn, its time at each of ROWS over F.linear's summed, F.linear unless another takes
    under MARGIN of its time."""
    routes = {"mkl": [lambda x, w=w: F.linear(x, w) for w in weights], "onednn": [PackedLinear(w) for w in weights]}
    if isa is not None:
        routes["ours"] = [DenseLinear(w, isa) for w in weights]
    xs = [torch.randn(rows, weights[0].shape[1]) for rows in ROWS]
    times = {name: [_seconds(fns, x) for x in xs] for name, fns in routes.items()}
    cost = {name: sum(t / base for t, base in zip(ts, times["mkl"])) for name, ts in times.items()}
    best = min(cost, key=cost.get)
    return best if cost[best] < MARGIN * cost["mkl"] else "mkl"


@torch.inference_mode()
def pack(
    model: nn.Module, isa: str | None = None, min_bytes: int = MIN_BYTES, force: str | None = None
) -> dict[tuple[int, int], str]:
    """Give the fp32 linear layers of `model` of `min_bytes` or more oneDNN's packed weights or our kernel's
    (`isa`: its instruction set, None where it is not built) wherever that is faster, timed per weight shape
    on the first layers of that shape (`force`: that route for every shape, untimed, for tests). Returns the
    route chosen for each shape ("onednn", "ours" or "mkl")."""
    if not torch.backends.mkldnn.is_available():
        return {}
    groups: dict[tuple[int, int], list[nn.Module]] = defaultdict(list)
    for layer in model.modules():
        if _packable(layer, min_bytes):
            groups[tuple(layer.weight.shape)].append(layer)
    routes = {}
    for shape, layers in groups.items():
        sample = layers[: max(1, SAMPLE_BYTES // (shape[0] * shape[1] * 4))]  # enough to read past the caches
        route = routes[shape] = force or _route([layer.weight.data for layer in sample], isa)
        for layer in layers if route != "mkl" else []:  # one at a time: one weight's copy at most in memory
            w = layer.weight.data
            layer.kernel = PackedLinear(w) if route == "onednn" else DenseLinear(w, isa)
            del layer.weight  # a tied input embedding keeps its own reference
    if routes:
        trim()  # the freed fp32 weights' pages (measured: 460 MB on SmolLM2)
    return routes
