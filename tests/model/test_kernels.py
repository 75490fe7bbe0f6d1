"""Our native kernels (`model.kernels`, `torch.ops.nlg`) against an fp64 reference, on every instruction set
this CPU runs, for both weight forms (int4, int6) and the row counts and shapes that take the kernel's edge
paths; and the layers that route to them; the step ops (norms, rotary, attention, SwiGLU) against torch's."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from model import kernels
from parallel import quant
from parallel.quant import GROUP, Int4Linear, Int6Linear, quantize_groups


@pytest.fixture(scope="module")
def best() -> str:
    isa = kernels.load()
    if isa is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: torch's kernel runs")
    assert isa is not None, "the native kernels did not build on a machine with a C++ compiler"
    return torch.ops.nlg.isas()[-1]


def rounded(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """x rounded to int8 as the kernels round it: per block of 32, d = absmax / 127 (llama.cpp's Q8_0); or
    for the K-quants' layouts per 256 (llama.cpp's Q8_K), each block of 32 with that d halved as many times as
    its values allow, at most 3 (`FINER` in matmul.cpp)."""
    m, k = x.shape
    blocks = x.reshape(m, k // group, group // GROUP, GROUP)
    amax = blocks.abs().amax((-2, -1), keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, 0)
    if group > GROUP:
        own = blocks.abs().amax(-1, keepdim=True)
        halvings = sum(((own * 2.0**e <= amax) for e in (1, 2, 3)), torch.zeros_like(own)).float()
        inv, d = inv * 2**halvings, (amax / 127) / 2**halvings
    else:
        d = amax / 127
    return (torch.round(blocks * inv) * d).reshape(m, k)


def reference(x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in float64: activations as given (rounded by the caller), scales and lows
    rounded to fp16 (the packed layout's), weights exact."""
    m, k = x.shape
    xq = x.double()
    s, lo = scale.half().double(), low.half().double()
    n = levels.shape[0]
    w = (levels.double().reshape(n, s.shape[1], -1) * s[..., None] + lo[..., None]).reshape(n, k)
    return (xq @ w.T).float()


def weights(bits: int, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random levels 0..2^bits - 1 with scales and lows per 32 (int4) or 16 (int6) columns; int8: levels
    -128..127, scales per 32 columns, lows zero."""
    per = 16 if bits == 6 else 32
    if bits == 8:
        levels = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, k // per, generator=g) / 128
        return levels, scale, torch.zeros_like(scale)
    levels = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // per, generator=g) / 2**bits
    return levels, scale, -scale * 2 ** (bits - 1) + torch.randn(n, k // per, generator=g) * 0.01


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 64, 70])
@pytest.mark.parametrize("n,k", [(1, 32), (15, 64), (16, 96), (17, 32), (40, 320), (60, 64)])
def test_kernel_equals_the_reference_on_every_instruction_set(best, bits, rows, n, k):
    """Guards the packed layouts (nibbles, from levels one or two per byte; int6's 2-bit plane, its two scale
    groups per block; int8's signed levels, -128 among them, and its scales after the levels), the tile edges
    (output rows off a multiple of 16: masked stores; tiles in pairs and one left over), the row passes (1-8
    activation rows per weight read, 1-6 over a pair of tiles, and the 64-row chunks) and each ISA's own code
    path: all give the product of the int8-rounded activations with the dequantized weight, and with
    `precise` that of the activations as they are."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k + bits)
    levels, scale, low = weights(bits, n, k, g)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[0, :GROUP] = 0  # a block of zeros: scale 0, no division by it
    packed = torch.ops.nlg.pack(levels, scale, low, bits)
    if bits == 4:  # the stored form, two levels per byte, packs to the same tiles
        assert torch.equal(torch.ops.nlg.pack(levels[:, 0::2] | (levels[:, 1::2] << 4), scale, low, 4), packed)
    want = reference(rounded(x), levels, scale, low)
    exact = reference(x, levels, scale, low)
    for isa in torch.ops.nlg.isas():  # every instruction set this CPU runs
        got = torch.ops.nlg.matmul(x, packed, n, isa)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=isa)
        precise = torch.ops.nlg.matmul(x, packed, n, isa, True)  # the rounding multiplied in a second pass
        torch.testing.assert_close(precise, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item(), msg=isa)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17, 70])
@pytest.mark.parametrize("n,k", [(1, 1), (15, 3), (16, 96), (17, 33), (40, 577)])
def test_dense_kernel_equals_float64_on_every_instruction_set(best, rows, n, k):
    """fp32 (`nlg::dense` on `nlg::pack_dense`'s tiles): the tile edges (output rows off a multiple of 16,
    the padded rows never stored), the passes (1-8 rows a weight read, each row count's chains of adds, the
    columns left over by two chains) and each ISA's code path give x @ w.T within float rounding."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    want = (x.double() @ w.double().T).float()
    packed = torch.ops.nlg.pack_dense(w)
    assert packed.shape == ((n + 15) // 16, k, 16)
    for isa in torch.ops.nlg.isas():
        assert_close(torch.ops.nlg.dense(x, packed, n, isa), want, rtol=1e-5, atol=1e-5 * k**0.5, msg=isa)


def test_activations_round_half_to_even_in_column_order_on_every_instruction_set(best):
    """Each instruction set's quantizer (a block of 32 to int8, d = absmax / 127) keeps the columns in order
    and rounds ties to even, as torch.round: with d = 1 (absmax 127) and the weight an identity (output row o
    reads column o alone), the output is the rounded activations themselves."""
    k = 64
    x = torch.arange(-40, 40, dtype=torch.float32)[:k].reshape(1, k) + 0.5  # ties: -39.5 ... 23.5
    x = torch.cat([x, -x.flip(1), torch.rand(1, k, generator=torch.Generator().manual_seed(0)) * 250 - 125])
    x[:, 0::GROUP] = 127.0  # each block's absmax
    levels = torch.eye(k, dtype=torch.uint8)
    packed = torch.ops.nlg.pack(levels, torch.ones(k, k // GROUP), torch.zeros(k, k // GROUP), 4)
    for isa in torch.ops.nlg.isas():
        assert torch.equal(torch.ops.nlg.matmul(x, packed, k, isa), torch.round(x)), isa


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_a_row_gets_the_same_bits_alone_as_in_a_batch(best, bits):
    """Batch invariance of the general layouts: one row's output is bitwise the same multiplied alone
    (one-tile kernel) as among 13 rows (AVX-512 VNNI's two-tile passes for int4, row passes of 8 otherwise),
    so a request's greedy tokens do not depend on what else the step carries (the K-quants' layouts keep it
    on AVX-512 VNNI within float rounding only: `test_k_quant_layouts_equal_the_reference_...`)."""
    g = torch.Generator().manual_seed(bits)
    levels, scale, low = weights(bits, 70, 320, g)
    packed = torch.ops.nlg.pack(levels, scale, low, bits)
    x = torch.randn(13, 320, generator=g)
    for isa in torch.ops.nlg.isas():
        batch = torch.ops.nlg.matmul(x, packed, 70, isa)
        alone = torch.cat([torch.ops.nlg.matmul(x[i : i + 1], packed, 70, isa) for i in range(13)])
        assert torch.equal(batch, alone), isa


def k_quant_weights(bits: int, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Levels with scales and lows made as GGUF's K-quants make them: codes times an fp16 factor per 256
    columns, the largest code of each 256 at -128 (Q6_K) or 63 (Q4_K). bits 6: levels -32..31, int8 sc per
    16 columns, lows 0; bits 4: levels 0..15, uint8 sc and mn per 32, low = -dmin * mn. Returns levels, scale,
    low and `pack_sub`'s arguments after the levels (sc, d[, mn, f])."""

    def coded(least: int, most: int, top: int, per: int, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
        codes = torch.randint(least, most + 1, (n, k // 256, per), generator=g).to(dtype)
        codes[..., 3] = top
        f = (torch.rand(n, k // 256, 1, generator=g) * 1e-3).half().float()
        return (f * codes.float()).reshape(n, -1), (codes.reshape(n, -1), f.reshape(n, -1))

    if bits == 6:
        levels = torch.randint(-32, 32, (n, k), generator=g, dtype=torch.int8)
        scale, packed = coded(-127, 127, -128, 16, torch.int8)
        return levels, scale, torch.zeros_like(scale), *packed
    levels = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, (sc, d) = coded(0, 63, 63, 8, torch.uint8)
    low, (mn, f) = coded(0, 63, 63, 8, torch.uint8)
    return levels, scale, -low, sc, d, mn, -f


def dequantized(bits: int, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The weight in fp64, from exact scales and lows (no fp16 rounding of the general layouts)."""
    n, k = levels.shape
    w = levels.double().reshape(n, -1, 16 if bits == 6 else 32) * scale.double()[..., None] + low.double()[..., None]
    return w.reshape(n, k)


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 13, 70])
@pytest.mark.parametrize("n,k", [(1, 256), (17, 512), (40, 768)])
def test_k_quant_layouts_equal_the_reference_on_every_instruction_set(best, bits, rows, n, k):
    """Q6_K's and Q4_K's own layouts (`pack_sub`: 8-bit codes per group, factors per 256 columns; int6 levels
    stored +32) give the product of the activations rounded as `rounded` rounds them per 256 columns with the
    weight on every ISA, for rows whose blocks differ up to 1000-fold in size; with `precise` that of the
    activations as they are (within 5e-4 of the largest output: both passes rounded per 256 columns, a block's
    what its super-block allows; per 32 columns reached 1.1e-4 on these rows), and a row's bits alone as in
    the batch (on AVX-512 VNNI, where one row takes another kernel, within float rounding); int4 levels two
    per byte pack to the same tiles."""
    g = torch.Generator().manual_seed(rows * 100 + n + k + bits)
    levels, scale, low, *codes = k_quant_weights(bits, n, k, g)
    packed = torch.ops.nlg.pack_sub(levels.add(32).view(torch.uint8) if bits == 6 else levels, *codes)
    assert packed.shape == (-(-n // 16), k // 256, quant.SUB_BYTES[bits])
    if bits == 4:
        assert torch.equal(torch.ops.nlg.pack_sub(levels[:, 0::2] | (levels[:, 1::2] << 4), *codes), packed)
    # blocks of 32 from 1/1000 to 1 times the largest, so that blocks take finer scales than their super-block's
    magnitude = torch.rand(rows, k // 32, 1, generator=g).pow(3).expand(rows, k // 32, 32).reshape(rows, k)
    x = torch.randn(rows, k, generator=g) * 5 * magnitude
    w = dequantized(bits, levels, scale, low)
    want, exact = (rounded(x, 256).double() @ w.T).float(), (x.double() @ w.T).float()
    for isa in torch.ops.nlg.isas():
        got = torch.ops.nlg.matmul(x, packed, n, isa)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=isa)
        precise = torch.ops.nlg.matmul(x, packed, n, isa, True)
        torch.testing.assert_close(precise, exact, rtol=1e-4, atol=5e-4 * exact.abs().max().item(), msg=isa)
        alone = torch.ops.nlg.matmul(x[-1:], packed, n, isa)
        if isa == "avx512vnni" and rows > 1:  # one row runs `tile_vnni`, scales in fp32 block by block
            torch.testing.assert_close(alone[0], got[-1], rtol=1e-5, atol=1e-6 * got.abs().max().item(), msg=isa)
        else:
            assert torch.equal(alone[0], got[-1]), isa


def test_k_quant_scales_are_found_exactly_or_the_general_layouts_run(best):
    """`sub_scales` recovers Q6_K's and Q4_K's codes and factors from the stored products exactly, and int6
    and int4 layers then take those layouts (6.6 and 4.625 bits a weight) computing the dequantized weight;
    Q6_K with lows, a scale no code times the factor makes, a Q4_K factor off fp16, or a width off 256
    columns keep the general layouts (8 and 5 bits a weight)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 512, generator=g)
    levels4, scale4, low4, *codes4 = k_quant_weights(4, 24, 512, g)
    found = quant.sub_scales(scale4, low4, 4)
    assert found is not None and all(torch.equal(a, b) for a, b in zip(found, codes4))
    layer4 = Int4Linear(levels4, scale4, low4)
    assert layer4.tiles.shape[-1] == quant.SUB_BYTES[4] and layer4.nbytes == 2 * 2 * quant.SUB_BYTES[4]
    want4 = x.double() @ dequantized(4, levels4, scale4, low4).T
    torch.testing.assert_close(layer4(x).double(), want4, rtol=0.02, atol=0.01 * want4.abs().max().item())
    odd4, off16 = scale4.clone(), scale4.clone()
    odd4[2, 3] *= 1.0001
    off16[:, :8] *= 1 + 2**-12  # every code the same, the factor no longer an fp16 value
    for scale in (odd4, off16):
        assert quant.sub_scales(scale, low4, 4) is None and Int4Linear(levels4, scale, low4).tiles.shape[-1] == 320
    levels, scale, low, sc, d = k_quant_weights(6, 24, 512, g)
    found = quant.sub_scales(scale, low)
    assert found is not None and torch.equal(found[0], sc) and torch.equal(found[1], d)
    layer = Int6Linear(*Int6Linear.fits(levels, scale, low))
    assert layer.tiles.shape[-1] == quant.SUB_BYTES[6] and layer.nbytes == 2 * 2 * quant.SUB_BYTES[6]
    want = x.double() @ dequantized(6, levels, scale, low).T
    torch.testing.assert_close(layer(x).double(), want, rtol=0.02, atol=0.01 * want.abs().max().item())
    odd = scale.clone()
    odd[0, 1] *= 1.0001
    for args in [(levels, scale, low + 1e-3), (levels, odd, low), (levels[:, :384], scale[:, :24], low[:, :24])]:
        assert quant.sub_scales(*args[1:]) is None
        assert Int6Linear(*Int6Linear.fits(*args)).tiles.shape[-1] == 512


def test_packing_refuses_what_the_layout_cannot_hold(best):
    """Levels past the form's range, scales past fp16 and widths off the blocks are refused, not wrapped."""
    g = torch.Generator().manual_seed(0)
    levels, scale, low = weights(6, 16, 64, g)
    with pytest.raises(RuntimeError, match="levels above 15"):
        torch.ops.nlg.pack(levels, scale[:, ::2], low[:, ::2], 4)
    with pytest.raises(RuntimeError, match="fp16"):
        torch.ops.nlg.pack(levels, scale * 1e8, low, 6)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.nlg.pack(levels[:, :48], scale[:, :3], low[:, :3], 6)
    levels, scale, low = weights(8, 16, 64, g)
    with pytest.raises(RuntimeError, match="no lows"):
        torch.ops.nlg.pack(levels, scale, low + 1e-3, 8)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.nlg.pack(levels.view(torch.uint8), scale, low, 8)


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
    before = quant.native()
    quant.use_native(None)
    try:
        assert hasattr(Int4Linear(levels, scale, low), "packed")
    finally:
        quant.use_native(before)


@pytest.mark.parametrize("group,lo,hi", [(16, -32, 31), (32, 0, 31), (32, -16, 15)])
def test_stored_5_and_6_bit_forms_run_as_int6_without_loss(best, group, lo, hi):
    """Q6_K (levels -32..31, groups of 16), Q5_1/Q5_K (0..31) and Q5_0 (-16..15, groups of 32) in their stored
    int8 form become int6 layers computing the same dequantized weight (the least level folded into the
    lows); a form spanning more than 64 levels (Q8_0) is not int6."""
    g = torch.Generator().manual_seed(group + lo)
    n, k = 24, 128
    levels = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.01
    low = torch.randn(n, k // group, generator=g) * 0.01
    deq = (levels.double().reshape(n, -1, group) * scale.double()[..., None] + low.double()[..., None]).reshape(n, k)
    layer = Int6Linear(*Int6Linear.fits(levels, scale, low))
    x = torch.randn(3, k, generator=g)
    want = x.double() @ deq.T
    torch.testing.assert_close(layer(x).double(), want, rtol=0.02, atol=0.01 * want.abs().max().item())
    wide = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    assert Int6Linear.fits(wide, scale, low) is None


@pytest.mark.parametrize("layout", ["general", "q6"])
def test_int6_packs_in_chunks_as_whole(best, monkeypatch, layout):
    """A big stored matrix (an LM head) is converted and packed a chunk of rows at a time: the same tiles as
    whole, with a last chunk that ends inside a tile, in either layout."""
    g = torch.Generator().manual_seed(7)
    n, k = 72, 256
    if layout == "q6":
        levels, scale, low = k_quant_weights(6, n, k, g)[:3]
    else:
        levels = torch.randint(-32, 32, (n, k), generator=g, dtype=torch.int8)
        scale, low = torch.rand(n, k // 16, generator=g) * 0.01, torch.randn(n, k // 16, generator=g) * 0.01
    whole = Int6Linear(*Int6Linear.fits(levels, scale, low)).tiles
    monkeypatch.setattr(quant, "CHUNK", 32)
    assert torch.equal(Int6Linear(*Int6Linear.fits(levels, scale, low)).tiles, whole)


def test_matmul_traces_under_compile(best):
    """torch.compile traces our matmul (its registered output shape) to the eager values."""
    g = torch.Generator().manual_seed(3)
    packed = torch.ops.nlg.pack(*weights(4, 24, 64, g), 4)
    x = torch.randn(5, 64, generator=g)
    traced = torch.compile(lambda x: torch.ops.nlg.matmul(x, packed, 24, best) * 2, fullgraph=True)
    torch.testing.assert_close(traced(x), torch.ops.nlg.matmul(x, packed, 24, best) * 2)


@pytest.mark.parametrize("shape", [(1, 1, 576), (8, 1, 1536), (3, 70, 100), (2, 5, 1)])
def test_norms_equal_torchs_on_every_instruction_set(best, shape):
    """`rms_norm` and `add_rms_norm` (the residual added first, the sum returned as the next residual) against
    torch's `F.rms_norm`: rows of 1 to 210, widths off every vector size (100, 1); a row's bits alone as in a
    batch of them."""
    g = torch.Generator().manual_seed(7)
    x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    for isa in torch.ops.nlg.isas():
        assert_close(torch.ops.nlg.rms_norm(x, w, 1e-6, isa), F.rms_norm(x, (shape[-1],), w, 1e-6))
        normed, total = torch.ops.nlg.add_rms_norm(x, r, w, 1e-6, isa)
        assert torch.equal(total, x + r), isa
        assert_close(normed, F.rms_norm(x + r, (shape[-1],), w, 1e-6))
        alone = torch.ops.nlg.rms_norm(x.flatten(0, -2)[-1:], w, 1e-6, isa)
        assert torch.equal(alone[0], torch.ops.nlg.rms_norm(x, w, 1e-6, isa).flatten(0, -2)[-1]), isa


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize(
    "b,hkv,g,d,span",
    [(1, 2, 6, 128, 40), (4, 3, 3, 64, 100), (2, 1, 1, 64, 1), (3, 2, 2, 72, 17), (1, 1, 5, 8, 300)]
    + [(1, 2, 10, 40, 33)],
)
def test_decode_attention_equals_the_reference_on_every_instruction_set(best, b, t, hkv, g, d, span):
    """`t` query tokens per row, each against its first `lengths[b, t]` keys of a strided cache view (the
    layout `attend` passes: positions of a larger region), grouped query heads (10: more than the 8 a pass
    keeps in registers), head sizes off the vector width (72, 40, 8), softmax over 1 to 300 keys with the
    exp of our own: against fp64 attention under the same mask, within twice the error of torch's own fp32
    attention; and a query's bits the same alone as among the row's others (a decode step and
    speculation's verify step agree)."""
    gen = torch.Generator().manual_seed(b * 1000 + span + t)
    q = torch.randn(b, t, hkv, g, d, generator=gen)
    kv = torch.randn(2, b, hkv, span + 9, d, generator=gen) * 3
    k, v = kv[0][:, :, :span], kv[1][:, :, :span]
    lengths = torch.randint(1, span + 1, (b, t), generator=gen)
    lengths[0, 0] = span
    mask = torch.arange(span) < lengths[..., None]  # (B, T, S)
    rows = q.permute(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)  # (B, Hkv, T x G, D) against the same keys
    mask = mask.repeat_interleave(g, 1)[:, None]  # (B, 1, T x G, S)

    def shaped(out: torch.Tensor) -> torch.Tensor:
        return out.reshape(b, hkv, t, g, d).permute(0, 2, 1, 3, 4)

    want = shaped(F.scaled_dot_product_attention(rows.double(), k.double(), v.double(), attn_mask=mask))
    torchs = (shaped(F.scaled_dot_product_attention(rows, k, v, attn_mask=mask)) - want).abs().max()  # fp32 rounding
    for isa in torch.ops.nlg.isas():
        got = torch.ops.nlg.decode_attention(q, k, v, lengths, d**-0.5, isa)
        assert (got - want).abs().max() <= 2 * torchs + 1e-6, isa
        last = torch.ops.nlg.decode_attention(q[:, -1:], k, v, lengths[:, -1:], d**-0.5, isa)
        assert torch.equal(last, got[:, -1:]), isa


@pytest.mark.parametrize("shape", [(1, 1, 2 * 8960), (3, 70, 2 * 96), (2, 5, 2 * 7)])
def test_silu_mul_equals_torchs_on_every_instruction_set(best, shape):
    """silu(gate) * up of the merged projection's output (gate first), widths off every vector size, gates
    far past exp's range either way (100, -100: torch's 100 * up and 0): against torch's to fp32 rounding."""
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g) * 6
    x.view(-1)[:4] = torch.tensor([100.0, -100.0, 0.0, -88.5])
    gate, up = x.chunk(2, -1)
    for isa in torch.ops.nlg.isas():
        assert_close(torch.ops.nlg.silu_mul(x, isa), F.silu(gate) * up, rtol=1e-5, atol=1e-6, msg=isa)


@pytest.mark.parametrize("b,t,h,d", [(1, 1, 14, 128), (2, 5, 12, 64), (3, 2, 3, 6)])
def test_rope_equals_torchs_on_every_instruction_set(best, b, t, h, d):
    """Rotary embedding of the q and k heads, read from the qkv projection's output as `Attention` slices it
    (strided: the v heads between rows): bitwise the model's torch formula (one near tie decides what
    SmolLM2 answers in `test_smollm2`)."""
    from model.llama import apply_rope

    g = torch.Generator().manual_seed(b * t * h)
    qkv = torch.randn(b, t, h + 2, d, generator=g)
    x = qkv[:, :, :h]
    angles = torch.rand(b, t, 1, d // 2, generator=g) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)
    for isa in torch.ops.nlg.isas():
        assert torch.equal(torch.ops.nlg.rope(x, cos, sin, isa), apply_rope(x, cos, sin)), isa


def test_step_ops_refuse_what_they_cannot_run(best):
    """A clear error, not a wrong answer: lengths past the keys, dtypes other than fp32, an unknown ISA."""
    q, k = torch.randn(1, 1, 1, 2, 8), torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="length"):
        torch.ops.nlg.decode_attention(q, k, k, torch.tensor([[5]]), 1.0, best)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.nlg.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), 1e-6, best)
    with pytest.raises(RuntimeError, match="isa"):
        torch.ops.nlg.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6, "neon")
