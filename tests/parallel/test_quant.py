"""Quantized weights (`--quantize int8|int4`): each kernel computes x @ dequantized(W).T; quantized models
stay close to the fp32 reference (transformers) and pick the same greedy tokens on the test models; the
weights a step reads shrink to about a quarter (int8) or an eighth (int4); tensor parallelism splits a
quantized model too, and refuses an int4 split off the group boundaries."""

from __future__ import annotations

import json

import pytest
import torch

from model.loader import load_model
from parallel.quant import GROUP, Int4Linear, Int8Linear, quantize_groups, quantize_rows, quantized, weight_bytes
from service.cli.parser import main

TINY = ["--model", "tiny-random"]


def test_int8_matmul_equals_the_dequantized_weight():
    """Per-row scales round each weight to within half a step, and the FBGEMM product (its 7-bit
    activations refined by a second pass) equals the product with the dequantized weight to ~1e-3."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    layer = Int8Linear(q, scale)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64).to(dtype)
        want = x.float() @ (q.float() * scale[:, None]).T
        got = layer(x)
        assert got.shape == (3, 5, 96) and got.dtype == dtype
        tol = 2e-3 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_int8_rows_do_not_depend_on_each_other():
    """Each row is quantized over its own range: a row beside a row of massive activations (a prompt's
    first token) gets the result it gets alone, for one row, a few (one call) and many (two calls)."""
    torch.manual_seed(0)
    layer = Int8Linear(*quantize_rows(torch.randn(64, 96)))
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
    """Each quantized layer holds about a quarter (int8) or a sixth (int4 with its group scales) of its
    fp32 bytes, the LM head int8 in both; no quantized layer keeps its fp32 weight."""
    fp32 = load_model_tiny("none")
    full = {name: m.weight.numel() * 4 for name, m in fp32.named_modules() if getattr(m, "quantizable", False)}
    for mode, share in (("int8", 0.26), ("int4", 0.16)):
        model = load_model_tiny(mode)
        layers = {name: m for name, m in model.named_modules() if getattr(m, "quantizable", False)}
        assert layers.keys() == full.keys() and "lm_head" in layers
        for name, m in layers.items():
            assert not hasattr(m, "weight")
            assert m.kernel.nbytes < (0.26 if name == "lm_head" else share) * full[name]
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
