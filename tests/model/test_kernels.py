"""Our native int4 kernel (`model.kernels`, `torch.ops.nlg`) against an fp32 reference, on every instruction
set this CPU runs, for the row counts and shapes that take the kernel's edge paths."""

from __future__ import annotations

import shutil

import pytest
import torch

from model import kernels
from parallel import quant
from parallel.quant import GROUP, Int4Linear, quantize_groups

ORDER = ["portable", "avx2", "avx512vnni"]


@pytest.fixture(scope="module")
def best() -> str:
    isa = kernels.load()
    if isa is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: torch's kernel runs")
    assert isa is not None, "the native kernels did not build on a machine with a C++ compiler"
    return torch.ops.nlg.best_isa()


def runnable(best: str) -> list[str]:
    return ORDER[: ORDER.index(best) + 1]


def reference(x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64: activations rounded to int8 per block of 32 (d = absmax / 127,
    as llama.cpp's Q8_0), scales and lows rounded to fp16 (the packed layout's), weights exact."""
    m, k = x.shape
    blocks = x.reshape(m, k // GROUP, GROUP)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0))
    xq = (q * (amax / 127)).reshape(m, k).double()
    s, lo = scale.half().double(), low.half().double()
    n = levels.shape[0]
    w = (levels.double().reshape(n, -1, GROUP) * s[..., None] + lo[..., None]).reshape(n, k)
    return (xq @ w.T).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 64, 70])
@pytest.mark.parametrize("n,k", [(1, 32), (15, 64), (16, 96), (17, 32), (40, 320)])
def test_int4_kernel_equals_the_reference_on_every_instruction_set(best, rows, n, k):
    """Guards the packed layout, the tile edges (output rows off a multiple of 16: masked stores), the row
    passes (1-8 activation rows per weight read, and the 64-row chunks) and each ISA's own code path: all
    give the product of the int8-rounded activations with the dequantized weight."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[0, :GROUP] = 0  # a block of zeros: scale 0, no division by it
    levels, scale, low = quantize_groups(w)
    packed = torch.ops.nlg.pack_int4(levels, scale, low)
    want = reference(x, levels, scale, low)
    for isa in runnable(best):
        got = torch.ops.nlg.int4_mm(x, packed, n, isa)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=isa)


def test_int4_layer_routes_to_the_kernel_and_back(best):
    """An int4 layer made after `use_native` holds the packed tiles and computes x @ dequantized(W).T to
    the int8 rounding of the activations (relative error ~1%); bf16 inputs come back bf16; a layer whose
    scales exceed fp16 keeps torch's kernel; without `use_native`, torch's kernel."""
    torch.manual_seed(0)
    w = torch.randn(48, 4 * GROUP)
    levels, scale, low = quantize_groups(w)
    deq = (levels.float().reshape(48, 4, GROUP) * scale[..., None] + low[..., None]).reshape(48, -1)
    x = torch.randn(3, 5, 4 * GROUP)
    layer = Int4Linear(levels, scale, low)
    assert hasattr(layer, "tiles") and layer.isa == best
    got = layer(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ deq.T, rtol=0.02, atol=0.02 * (x @ deq.T).abs().max().item())
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert hasattr(Int4Linear(levels, scale * 1e6, low), "packed")
    before = quant._native
    quant.use_native(None)
    try:
        assert hasattr(Int4Linear(levels, scale, low), "packed")
    finally:
        quant.use_native(before)
