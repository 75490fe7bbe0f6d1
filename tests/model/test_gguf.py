"""GGUF files of the Qwen2 architecture (q/k/v biases, no llama.cpp q/k permutation, a byte-level BPE
tokenizer with a ChatML template), written here with the `gguf` writer in every tensor type the Python
side can quantize, convert to the same model `transformers` builds from the GGUF file itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize
from torch.testing import assert_close
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.gguf import convert
from model.loader import load_model
from model.tokenizer import Tokenizer

HIDDEN, FFN, HEADS, KV, LAYERS = 64, 128, 4, 2, 2
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# every type gguf-py can quantize (the K-quants it only reads: the real Qwen models' slow tests cover them)
TYPES = {
    "attn_q": T.Q8_0,
    "attn_k": T.Q4_0,
    "attn_v": T.Q4_1,
    "attn_output": T.Q5_0,
    "ffn_gate": T.Q5_1,
    "ffn_up": T.F16,
    "ffn_down": T.BF16,
}


def vocabulary() -> tuple[list[str], list[str], list[int]]:
    """Byte-level BPE: the 256 byte symbols, a few merges, ChatML's control tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return tokens + specials, merges, [1] * len(tokens) + [3] * len(specials)


def write_qwen2_gguf(path) -> None:
    tokens, merges, types = vocabulary()
    g = torch.Generator().manual_seed(0)
    w = GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def tensor(name: str, *shape: int, kind=T.F32, scale=0.08) -> None:
        x = (torch.randn(*shape, generator=g) * scale).numpy()
        if kind == T.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quantize(x, kind), raw_dtype=kind)

    d = HIDDEN // HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN, kind=T.Q8_0, scale=1.0)
    tensor("output_norm.weight", HIDDEN, scale=1.0)
    for i in range(LAYERS):
        rows = {"attn_q": HEADS * d, "attn_k": KV * d, "attn_v": KV * d, "attn_output": HIDDEN}
        rows |= {"ffn_gate": FFN, "ffn_up": FFN, "ffn_down": HIDDEN}
        for part, n in rows.items():
            tensor(f"blk.{i}.{part}.weight", n, FFN if part == "ffn_down" else HIDDEN, kind=TYPES[part])
        for part in ("attn_q", "attn_k", "attn_v"):
            tensor(f"blk.{i}.{part}.bias", rows[part], scale=0.5)
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN, scale=1.0)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN, scale=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    write_qwen2_gguf(root / "tiny-qwen2.gguf")
    return root / "tiny-qwen2.gguf", convert(root / "tiny-qwen2.gguf", root / "converted")


def test_qwen2_gguf_logits_equal_transformers_own_gguf_load(qwen2):
    """Every tensor type dequantized, the biases kept, q and k left unpermuted: the converted model's
    logits equal those of `transformers` loading the GGUF file itself."""
    from transformers import AutoModelForCausalLM

    gguf, directory = qwen2
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = load_model(directory)
    ids = torch.randint(0, ref.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref(ids).logits
        got = ours(ids, torch.arange(20)[None].expand(2, 20))
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_qwen2_gguf_tokenizer_and_chat_template(qwen2):
    """The BPE tokenizer and ChatML template come through the conversion as `transformers` reads them."""
    from transformers import AutoTokenizer

    gguf, directory = qwen2
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = Tokenizer(directory)
    text = "in the hat, the cat"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "the hat"}]
    chat = ours.chat(msgs)
    assert chat == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens = vocabulary()[0]
    assert chat[0] == tokens.index("<|im_start|>") and tokens.index("<|im_end|>") in chat
    assert ours.decode(chat) == "user\nthe hat\nassistant\n"  # control tokens are not text


def test_converted_config_is_qwen2(qwen2):
    """transformers reads the written config.json as Qwen2 (q/k/v bias only), not Llama with
    attention_bias (which would add an o_proj bias)."""
    import json

    cfg = json.loads((qwen2[1] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert np.isclose(cfg["rope_theta"], 1e6) and cfg["num_key_value_heads"] == KV
