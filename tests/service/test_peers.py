"""`nlg bench`'s peer engines (`service.bench.peers`, the `bench` extra) on our weights (tiny-random's; for
llama.cpp, SmolLM2's GGUF file): each decodes the greedy tokens we do. Skipped where the extra is not
installed (CI)."""

from __future__ import annotations

import pytest

from service.bench import peers
from service.engine.generator import TextGenerator
from service.engine.sampling_params import SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 11], [200, 1, 64, 33]]


@pytest.mark.parametrize("name", ["ctranslate2", "onnxruntime_genai"])
def test_peer_decodes_our_greedy_tokens(name):
    """A peer's converted weights (the checkpoint transformers loads) give our greedy tokens, so its rate
    is for the same work."""
    pytest.importorskip(name)
    gen = TextGenerator.load("tiny-random")
    ours = gen.engine.generate(PROMPTS[:1], [SamplingParams(max_tokens=8, ignore_eos=True)])[0].token_ids
    hf = peers.hf_export(gen.directory, gen.directory.name)
    report = getattr(peers, name)(hf, PROMPTS, 8)
    assert report["tokens"] == ours
    assert report["single_stream_tok_s"] > 0 and report["batch8_tok_s"] > 0


def test_llama_cpp_decodes_our_greedy_tokens():
    """llama.cpp on SmolLM2's GGUF file (Q4_1, which our int4 kernels hold without loss) gives our first
    greedy tokens, and times one stream, eight and the prefill prompt."""
    pytest.importorskip("llama_cpp")
    from model.registry import fetch_gguf
    from service.bench.cpu import PROMPTS as TEXTS
    from service.bench.cpu import prefill_prompt

    gen = TextGenerator.load("smollm2-135m-instruct", quantization="int4")
    prompts = [gen.tokenizer.encode(t) for t in TEXTS]
    ours = gen.engine.generate(prompts[:1], [SamplingParams(max_tokens=8, ignore_eos=True)])[0].token_ids
    report = peers.llama_cpp(fetch_gguf("smollm2-135m-instruct"), prompts, 8, prefill_prompt(prompts, 100))
    assert report["tokens"] == ours
    assert min(report[k] for k in ("single_stream_tok_s", "batch8_tok_s", "prefill_tok_s")) > 0
