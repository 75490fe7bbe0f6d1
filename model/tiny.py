"""`tiny-random`: the CPU test model. A small Llama-family network with deterministic random
weights and a byte-level tokenizer made here (no download), written once as an ordinary Hugging
Face directory so it loads through the same sharded loader as every other model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from model.config import PRESETS, ModelConfig

SEED = 0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def random_weights(cfg: ModelConfig, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Deterministic weights named like a Llama checkpoint (std 0.02, norms at 1, printable ASCII rows
    of the embedding scaled up)."""
    g = torch.Generator().manual_seed(seed)
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    embed = normal(cfg.vocab_size, h)
    printable = byte_tokenizer().encode("".join(map(chr, range(32, 127)))).ids
    embed[printable] *= 4  # the tied head then favours printable ASCII: tests see real text, not stray bytes
    w = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        w |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": normal(cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": normal(cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": normal(h, cfg.num_heads * d),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        }
        if cfg.attention_bias:
            for name, rows in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
                w[p + f"self_attn.{name}_proj.bias"] = normal(rows * d)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = normal(cfg.vocab_size, h)
    return w


def byte_tokenizer() -> Tokenizer:
    """Special tokens at ids 0-2, then one token per byte (GPT-2's byte-to-character map)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def write_tokenizer(directory: Path) -> None:
    byte_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
        "model_max_length": PRESETS["tiny-random"].max_position,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_model_dir(directory: Path, cfg: ModelConfig, seed: int = SEED) -> None:
    """A Hugging Face directory with random weights for `cfg` and the byte-level tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(cfg, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf() | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    write_tokenizer(directory)
