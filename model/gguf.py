"""Convert a llama-, qwen2- or gpt2-architecture GGUF file into a Hugging Face directory (safetensors,
tokenizer.json, config.json), once, so later loads read safetensors in seconds. Llama and Qwen2
quantized tensors stay quantized (`model.gguf_quant`: 4-bit types as our int4 without loss, 5-8 bit ones
as int8 levels with their group scales); the loader dequantizes them only for `--quantize none`. GPT-2
tensors are written in fp32 (its checkpoints keep linears as Conv1D, input-major, which the stored quantized
forms are not; GPT-2 files are small, and `--quantize` still quantizes at load).

Traps handled here:
- llama.cpp's converter permutes the rows of q and k of llama models for its rotary layout; we undo it
  per head. It leaves qwen2's as they are (Qwen2 uses the halves layout already).
- GGUF lists shapes innermost-first: [576, 49152] is a (49152, 576) matrix.
- llama.cpp writes GPT-2's linears transposed from Conv1D, and the tied LM head as a copy of the
  embedding (`output.weight`); we transpose back and tie again when the copy is equal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

from model.config import ModelConfig
from model.gguf_quant import stored
from model.heap import trim

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHITECTURES = ("llama", "qwen2", "gpt2")  # what `convert` reads (GGUF's general.architecture)
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def read_metadata(reader: GGUFReader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def hf_name(name: str, gpt2: bool = False) -> str:
    names, block, prefix = (GPT2_NAMES, GPT2_BLOCK, "transformer.h") if gpt2 else (NAMES, BLOCK, "model.layers")
    if name in names:
        return names[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in block:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"{prefix}.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows: per head, interleaved pairs -> two halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF directory for `gguf_path` to `out_dir` (atomically: built aside, then renamed)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    arch = meta["general.architecture"]
    embedding, output = by_name["token_embd.weight"], by_name.get("output.weight")
    tied = output is None or (
        arch == "gpt2" and output.tensor_type == embedding.tensor_type and np.array_equal(output.data, embedding.data)
    )
    cfg = ModelConfig.from_gguf(meta | {"tied": tied, "vocab_rows": int(embedding.shape[1])})
    tensors = {}
    for t in reader.tensors:
        if arch == "gpt2":
            if t.name == "output.weight" and tied:
                continue
            shape = [int(x) for x in reversed(t.shape)]
            w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            w = w.T if t.name.endswith(GPT2_CONV1D) else w
            tensors[hf_name(t.name, gpt2=True)] = torch.from_numpy(np.ascontiguousarray(w))
            continue
        heads = {"attn_q.weight": cfg.num_heads, "attn_k.weight": cfg.num_kv_heads}.get(t.name.split(".", 2)[-1])
        rows_fn = (lambda a, h=heads: unpermute(a, h)) if arch == "llama" and heads else (lambda a: a)
        shape = [int(x) for x in reversed(t.shape)]
        tensors |= stored(hf_name(t.name), t.data, t.tensor_type, shape, rows_fn)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        trim()  # their pages: a server that converted at its start held 1.6 GB more otherwise (the 1.5B model)
        special = {
            k: int(meta[f"tokenizer.ggml.{k}"])
            for k in ("bos_token_id", "eos_token_id", "padding_token_id")
            if f"tokenizer.ggml.{k}" in meta
        }
        hf = cfg.to_hf() | {
            "torch_dtype": "float32",
            "bos_token_id": special.get("bos_token_id"),
            "eos_token_id": special.get("eos_token_id"),
        }
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        _write_tokenizer(gguf_path, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """The tokenizer and chat template, rebuilt from GGUF metadata by `transformers`' converter."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
