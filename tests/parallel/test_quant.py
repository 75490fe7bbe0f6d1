"""Weight-only int8 (`--quantize int8`): the packed kernel computes x @ dequantized(W).T; quantized models
stay close to the fp32 reference (transformers) and pick the same greedy tokens on the test models; the
weights a step reads shrink to about a quarter; tensor parallelism splits a quantized model too."""

from __future__ import annotations

import json

import pytest
import torch

from model.loader import load_model
from parallel.quant import int8_linear, quantize_rows
from service.bench.cpu import weight_bytes
from service.cli.parser import main

TINY = ["--model", "tiny-random"]


def test_int8_matmul_equals_the_dequantized_weight():
    """Per-row scales round each weight to within half a step, and the packed kernel's product equals
    the product with the dequantized weight (fp32 and bf16 activations)."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        x = torch.randn(3, 5, 64).to(dtype)
        want = x.float() @ (q.float() * scale.float()[:, None]).T
        got = int8_linear(x, q, scale.to(dtype))
        assert got.shape == (3, 5, 96) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_quantized_model_stays_close_to_transformers(hf_pair):
    """Each family (GQA, untied, Qwen2 biases, GPT-2 Conv1D) quantized: logits within a small fraction of
    their spread of transformers' fp32 ones, and most greedy picks the same."""
    hf, path = hf_pair
    ours = load_model(path, quantization="int8")
    ids = torch.randint(0, 301, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24)[None].expand(2, 24)
    with torch.inference_mode():
        want = hf(ids).logits
        got = ours(ids, pos)
    spread = want.max() - want.min()
    assert (got - want).abs().max() < 0.05 * spread
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_int8_reads_a_quarter_of_the_linear_bytes():
    """The quantized model's linear layers hold int8 weights and one scale per row."""
    fp32, int8 = (load_model_tiny(q) for q in ("none", "int8"))
    linear = sum(m.weight.numel() * 4 for m in fp32.modules() if type(m).__name__.endswith("ParallelLinear"))
    saved = weight_bytes(fp32) - weight_bytes(int8)
    assert saved > 0.7 * linear
    assert not any(type(m).__name__.endswith("ParallelLinear") and hasattr(m, "weight") for m in int8.modules())


def load_model_tiny(quantization: str):
    from model.registry import resolve

    return load_model(resolve("tiny-random"), quantization=quantization)


def test_cli_generates_with_int8(capfd):
    """`nlg generate --quantize int8` on the test model gives the fp32 greedy tokens (its margins are wide)."""
    args = ["generate", "Once upon a time", "--max-tokens", "16", "--json", *TINY]
    assert main(args) == 0
    fp32 = json.loads(capfd.readouterr().out)
    assert main([*args, "--quantize", "int8"]) == 0
    assert json.loads(capfd.readouterr().out)["token_ids"] == fp32["token_ids"]


@pytest.mark.heavy
def test_int8_under_tensor_parallelism(capfd):
    """tp=2 quantizes each rank's shard after slicing and decodes the same greedy tokens as tp=1 int8 on
    the test model (row-parallel scales are per rank, so logits agree to the quantization error only)."""
    args = ["generate", "Once upon a time", "--max-tokens", "16", "--json", "--quantize", "int8", *TINY]
    assert main(args) == 0
    alone = json.loads(capfd.readouterr().out)
    assert main([*args, "--tp", "2"]) == 0
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"] == alone["token_ids"]
