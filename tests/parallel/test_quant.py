"""Quantized weights (`--quantize int8|int4`): each kernel computes x @ dequantized(W).T; quantized models
stay close to the fp32 reference (transformers) and pick the same greedy tokens on the test models; the
weights a step reads shrink to about a quarter (int8) or an eighth (int4); tensor parallelism splits a
quantized model too, and refuses an int4 split off the group boundaries."""

from __future__ import annotations

import json

import pytest
import torch

from model.loader import load_model
from parallel import quant
from parallel.quant import GROUP, Int4Linear, Int8Linear, quantize_groups, quantized, weight_bytes
from service.cli.parser import main

TINY = ["--model", "tiny-random"]


@pytest.fixture(params=["ours", "fbgemm"])
def int8_route(request):
    """Int8 layers made on our kernel (`use_native`, skipped without a C++ compiler) or on FBGEMM."""
    from model import kernels

    before = quant.native()
    isa = kernels.load()
    if request.param == "ours" and isa is None:
        pytest.skip("our kernels did not build (no C++ compiler)")
    quant.use_native(isa if request.param == "ours" else None)
    yield request.param
    quant.use_native(before)


def test_int8_matmul_equals_the_dequantized_weight(int8_route):
    """Scales per 32 columns (ours: Q8_0's, fp16) or per row (FBGEMM's) round each weight to within half a
    step, and the product equals the one with the dequantized weight: to ~1e-3 through FBGEMM (its 7-bit
    activations refined by a second pass) and ours with `precise` (the activations' int8 rounding multiplied
    too), to that rounding (~1%) through ours."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == ((96, 2) if int8_route == "ours" else (96,))
    step = scale.reshape(96, -1).repeat_interleave(64 // scale.reshape(96, -1).shape[1], 1)
    deq = q.float() * step
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    layer = Int8Linear(q, scale)
    assert hasattr(layer, "tiles") == (int8_route == "ours")
    for precise, dtype in [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)]:
        layer.precise = precise
        x = torch.randn(3, 5, 64).to(dtype)
        want = x.float() @ deq.T
        got = layer(x)
        assert got.shape == (3, 5, 96) and got.dtype == dtype
        tol = 2e-2 if dtype == torch.bfloat16 or not (precise or int8_route == "fbgemm") else 2e-3
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_q8_0_runs_as_stored_on_our_kernel(int8_route):
    """A stored Q8_0 tensor (levels -128..127, an fp16 scale per 32 columns, no lows) runs on our kernel as
    it is, also from the int8 form's scales per 16 (`int8_form`, pairs of equal ones), within the int8
    rounding of the activations; FBGEMM takes rows only: there it is re-quantized to rows."""
    from parallel.stored import from_stored, int8_form

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8)
    scale = (torch.rand(40, 3, generator=g) / 100).half().float()
    stored = {"_int8": q, "_scale": scale, "_low": torch.zeros_like(scale)}
    layer = from_stored("int8", dict(stored), "int8")
    x = torch.randn(4, 96, generator=g)
    want = x @ (q.float().reshape(40, 3, 32) * scale[..., None]).reshape(40, 96).T
    torch.testing.assert_close(layer(x), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    if int8_route == "fbgemm":
        with pytest.raises(ValueError, match="our kernel"):
            Int8Linear(q, scale)
        return
    assert torch.equal(layer.tiles, Int8Linear(q, scale).tiles)
    assert torch.equal(from_stored("int8", int8_form("int8", stored), "int8").tiles, layer.tiles)
    layer.precise = True
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_int8_rows_do_not_depend_on_each_other(int8_route):
    """Each row is quantized over its own range (FBGEMM's rows; ours per block of 32 of each row): a row
    beside a row of massive activations (a prompt's first token) gets the result it gets alone, for one
    row, a few (one call) and many (two calls)."""
    torch.manual_seed(0)
    layer = Int8Linear(*quant.quantize_int8(torch.randn(64, 96)))
    for rows in (2, 4, 9):
        x = torch.randn(rows, 96) + 0.5
        x[0] *= 300
        alone = torch.cat([layer(r[None]) for r in x])
        torch.testing.assert_close(layer(x), alone, rtol=1e-4, atol=1e-4 * alone[1:].abs().max().item())


def test_int4_matmul_equals_the_dequantized_weight():
    """16 levels per group of GROUP columns round each weight to within half a step; the packed kernel
    (bf16 activations) gives the product with the dequantized weight to bf16 rounding."""
    torch.manual_seed(0)
    w = torch.randn(96, 4 * GROUP)
    levels, scale, low = quantize_groups(w)
    assert levels.max() <= 15 and scale.shape == (96, 4)
    deq = (levels.float().reshape(96, 4, GROUP) * scale[..., None] + low[..., None]).reshape(96, -1)
    assert ((deq - w).abs() <= scale.repeat_interleave(GROUP, 1) / 2 + 1e-5).all()
    x = torch.randn(3, 5, 4 * GROUP)
    got = Int4Linear(levels, scale, low)(x)
    assert got.shape == (3, 5, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ deq.T, rtol=0.02, atol=0.02 * (x @ deq.T).abs().max().item())


def test_int4_refuses_a_width_off_the_groups():
    """A weight whose (per-rank) input width is not a multiple of the group size is refused, naming
    the tensor-parallel sizes that would work."""
    with pytest.raises(ValueError, match=f"groups of {GROUP}"):
        quantized(torch.randn(8, GROUP + 8), "int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_stays_close_to_transformers(hf_pair, mode):
    """Each family (GQA, untied, Qwen2 biases, GPT-2 Conv1D) quantized: logits within a small fraction of
    their spread of transformers' fp32 ones, and most greedy picks the same (random weights have thin
    margins: int4's 16 levels move more of them)."""
    hf, path = hf_pair
    ours = load_model(path, quantization=mode)
    ids = torch.randint(0, 301, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24)[None].expand(2, 24)
    with torch.inference_mode():
        want = hf(ids).logits
        got = ours(ids, pos)
    spread = want.max() - want.min()
    assert (got - want).abs().max() < {"int8": 0.05, "int4": 0.1}[mode] * spread
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > {"int8": 0.9, "int4": 0.75}[mode]


def test_quantized_weights_are_a_quarter_or_an_eighth():
    """Each quantized layer holds about a quarter (int8: 8.5 bits a weight with Q8_0's scales per 32 columns on
    our kernel, 8 and a row's scale on FBGEMM) or a sixth (int4 with its group scales) of its fp32 bytes, the
    LM head int8 in both (its 259 rows padded to tiles of 16 on our kernel); no quantized layer keeps its fp32
    weight."""
    fp32 = load_model_tiny("none")
    full = {name: m.weight.numel() * 4 for name, m in fp32.named_modules() if getattr(m, "quantizable", False)}
    for mode, share in (("int8", 0.27), ("int4", 0.16)):
        model = load_model_tiny(mode)
        layers = {name: m for name, m in model.named_modules() if getattr(m, "quantizable", False)}
        assert layers.keys() == full.keys() and "lm_head" in layers
        for name, m in layers.items():
            assert not hasattr(m, "weight")
            assert m.kernel.nbytes < (0.29 if name == "lm_head" else share) * full[name]
        assert weight_bytes(model) < 0.5 * weight_bytes(fp32)


def load_model_tiny(quantization: str):
    from model.registry import resolve

    return load_model(resolve("tiny-random"), quantization=quantization)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cli_generates_quantized(capfd, mode):
    """`nlg generate --quantize` on the test model gives the fp32 greedy tokens (its margins are wide)."""
    args = ["generate", "Once upon a time", "--max-tokens", "16", "--json", *TINY]
    assert main(args) == 0
    fp32 = json.loads(capfd.readouterr().out)
    assert main([*args, "--quantize", mode]) == 0
    assert json.loads(capfd.readouterr().out)["token_ids"] == fp32["token_ids"]


@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_under_tensor_parallelism(capfd, mode):
    """tp=2 quantizes each rank's shard after slicing and decodes the same greedy tokens as tp=1 on the
    test model (row-parallel scales are per rank, so logits agree to the quantization error only)."""
    args = ["generate", "Once upon a time", "--max-tokens", "16", "--json", "--quantize", mode, *TINY]
    assert main(args) == 0
    alone = json.loads(capfd.readouterr().out)
    assert main([*args, "--tp", "2"]) == 0
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"] == alone["token_ids"]
