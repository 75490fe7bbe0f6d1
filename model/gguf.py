"""Convert a llama- or qwen2-architecture GGUF file into a Hugging Face directory (safetensors,
tokenizer.json, config.json), once, so later loads read safetensors in seconds. Quantized tensors stay
quantized (`model.gguf_quant`: 4-bit types as our int4 without loss, 5-8 bit ones as int8 rows); the
loader dequantizes them only for `--quantize none`.

Traps handled here:
- llama.cpp's converter permutes the rows of q and k of llama models for its rotary layout; we undo it
  per head. It leaves qwen2's as they are (Qwen2 uses the halves layout already).
- GGUF lists shapes innermost-first: [576, 49152] is a (49152, 576) matrix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from safetensors.torch import save_file

from model.config import ModelConfig
from model.gguf_quant import stored

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHITECTURES = ("llama", "qwen2")  # what `convert` reads (GGUF's general.architecture)
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


def read_metadata(reader: GGUFReader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def hf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in BLOCK:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{BLOCK[m.group(2)]}.{m.group(3)}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows: per head, interleaved pairs -> two halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF directory for `gguf_path` to `out_dir` (atomically: built aside, then renamed)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    rows = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    cfg = ModelConfig.from_gguf(meta | {"has_output": has_output, "vocab_rows": rows})
    permuted = meta["general.architecture"] == "llama"
    tensors = {}
    for t in reader.tensors:
        heads = {"attn_q.weight": cfg.num_heads, "attn_k.weight": cfg.num_kv_heads}.get(t.name.split(".", 2)[-1])
        rows_fn = (lambda a, h=heads: unpermute(a, h)) if permuted and heads else (lambda a: a)
        shape = [int(x) for x in reversed(t.shape)]
        tensors |= stored(hf_name(t.name), t.data, t.tensor_type, shape, rows_fn)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
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
