"""fp32 linear layers on a CPU through oneDNN with prepacked weights, where that measures faster.

`F.linear` calls MKL's sgemm, which on a 2-core AVX2 EPYC read SmolLM2's decode-step weights at ~13
GB/s of the ~29 GB/s the machine reads, and took 2x longer for 2 to 16 rows than for one. oneDNN's
matmul with the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`) read
them at ~24 GB/s, and 8 rows cost 1.6x one (measured over all 121 matmuls of a step: 41 against 22 ms
for one row, 85 against 35 ms for eight; a 512-row prefill chunk the same). Which is faster depends on
the CPU (MKL on Intel) and on the shape (oneDNN's call costs ~25 us more, which loses on tiny weights),
so `pack` measures both at load, per weight shape, and keeps the faster.

The packed weight is an opaque oneDNN tensor, a copy: a layer that takes it drops its own weight (a head
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
MARGIN = 0.9  # oneDNN is kept only when it takes under 90% of F.linear's time (noise must not flip it)


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


def _faster(weights: list[torch.Tensor]) -> bool:
    """Whether oneDNN takes under MARGIN of F.linear's time over `weights` in turn, at 1 and 8 rows."""
    packed = [PackedLinear(w) for w in weights]
    plain = [lambda x, w=w: F.linear(x, w) for w in weights]
    xs = [torch.randn(rows, weights[0].shape[1]) for rows in (1, 8)]
    return sum(_seconds(packed, x) for x in xs) < MARGIN * sum(_seconds(plain, x) for x in xs)


@torch.inference_mode()
def pack(model: nn.Module, measure: bool = True, min_bytes: int = MIN_BYTES) -> dict[tuple[int, int], str]:
    """Give the fp32 linear layers of `model` of `min_bytes` or more oneDNN's packed weights wherever that
    is faster, timed per weight shape on the first layers of that shape (`measure` False: packed without
    timing, for tests). Returns the route chosen for each shape ("onednn" or "mkl")."""
    if not torch.backends.mkldnn.is_available():
        return {}
    groups: dict[tuple[int, int], list[nn.Module]] = defaultdict(list)
    for layer in model.modules():
        if _packable(layer, min_bytes):
            groups[tuple(layer.weight.shape)].append(layer)
    routes = {}
    for shape, layers in groups.items():
        sample = layers[: max(1, SAMPLE_BYTES // (shape[0] * shape[1] * 4))]  # enough to read past the caches
        faster = not measure or _faster([layer.weight.data for layer in sample])
        routes[shape] = "onednn" if faster else "mkl"
        for layer in layers if faster else []:  # one at a time: one weight's copy at most in memory
            layer.kernel = PackedLinear(layer.weight.data)
            del layer.weight  # a tied input embedding keeps its own reference
    if routes:
        trim()  # the freed fp32 weights' pages (measured: 460 MB on SmolLM2)
    return routes
