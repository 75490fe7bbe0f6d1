"""Parity with `transformers` on the same weights (fp32, CPU): logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from model import kernels
from model.cpu_matmul import pack
from model.loader import load_model
from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 11], [200, 1, 64, 33]]  # different lengths: batch > 1


def load(path, route: str):
    """Our model on `path`, every linear layer through `route`: "mkl" (F.linear), "onednn" or "ours" (packed
    weights; `pack` keeps these tiny weights with F.linear unless forced)."""
    model = load_model(path)
    if route != "mkl":
        if route == "ours" and kernels.load() is None:
            pytest.skip("our kernels are not built")
        assert pack(model, kernels.load(), min_bytes=0, force=route)
        assert all(
            hasattr(m, "kernel") and not hasattr(m, "weight")
            for m in model.modules()
            if getattr(m, "quantizable", False)
        )
    return model


@pytest.mark.parametrize("route", ["mkl", "onednn", "ours"])
def test_logits_match_transformers_for_a_ragged_batch(hf_pair, route):
    """Guards the attention mask, RoPE layout, GQA head mapping, q/k/v bias, Conv1D transpose and tied
    or untied heads (packed: a tied head's packed copy, the bias added after the packed matmul): every
    position of every row must match the unpadded reference."""
    hf, path = hf_pair
    ours = load(path, route)
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = torch.tensor(p)
    positions = torch.arange(width).expand(len(PROMPTS), width)
    with torch.inference_mode():
        got = ours(ids, positions)
        for i, p in enumerate(PROMPTS):
            want = hf(torch.tensor([p])).logits[0]
            assert_close(got[i, : len(p)], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("route", ["mkl", "onednn", "ours"])
def test_greedy_tokens_match_transformers(hf_pair, route):
    """32 greedy tokens through our KV-cached engine (batched) equal `generate()` token for token."""
    hf, path = hf_pair
    engine = Engine(load(path, route), max_batch=4)
    params = SamplingParams(max_tokens=32)
    ours = engine.generate(PROMPTS, [params] * len(PROMPTS))
    for p, c in zip(PROMPTS, ours):
        want = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        assert c.token_ids == want
