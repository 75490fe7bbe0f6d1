"""GGUF quantized tensors in the project's own quantized forms (`parallel.quant`), never inflated whole.

- Q4_0, Q4_1, Q4_K: 16 levels per group of 32 weights with one scale and one offset per group, which is
  exactly our int4 form (GROUP 32): converted without loss, levels packed two per byte.
  Q4_0: w = (q - 8) d; Q4_1: w = q d + m; Q4_K: super-blocks of 256 with eight 6-bit sub-scales and
  sub-mins, w = d sc q - dmin m.
- Q5_0, Q5_1, Q5_K, Q6_K, Q8_0: dequantized one tensor at a time and re-quantized to int8 per row
  (the 5-8 bit levels do not fit 16; per-row int8 is what the CPU kernel reads).
- F32, F16, BF16, and every 1-D tensor: fp32.

Stored keys beside a weight key K: int4 `K_int4` (uint8 (out, in / 2): column 2j in the low nibble,
2j + 1 in the high one), `K_scale` and `K_low` (fp32 (out, in / 32)); int8 `K_int8` (int8 (out, in))
and `K_scale` (fp32 (out,)).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K, dequantize

from parallel.quant import GROUP, quantize_rows

INT4 = {T.Q4_0, T.Q4_1, T.Q4_K}
FLOAT = {T.F32, T.F16, T.BF16}


def int4_groups(data: np.ndarray, kind: T, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels uint8 (rows, cols), scale, low fp32 (rows, cols / 32)) with levels * scale + low equal to
    gguf's own dequantization of `data` (the tensor's raw blocks)."""
    if kind == T.Q4_K:
        blocks = data.reshape(-1, 144)
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        scale, low = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    else:
        blocks = data.reshape(-1, 18 if kind == T.Q4_0 else 20)
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        scale = d
        low = -8 * d if kind == T.Q4_0 else blocks[:, 2:4].view(np.float16).astype(np.float32)
        qs = blocks[:, -16:].reshape(-1, 1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    levels = (qs & np.uint8(0x0F)).reshape(rows, -1)
    return levels, scale.reshape(rows, -1), low.reshape(rows, -1)


def pack(levels: np.ndarray) -> np.ndarray:
    return levels[:, 0::2] | (levels[:, 1::2] << 4)


def stored(key: str, data: np.ndarray, kind: T, shape: list[int], rows_fn=lambda a: a) -> dict[str, torch.Tensor]:
    """The safetensors entries for GGUF tensor `data` of type `kind` and (rows, cols) `shape` under weight
    key `key`; `rows_fn` reorders rows (llama.cpp's q/k permutation undone) and applies to every form."""
    if kind in FLOAT or len(shape) == 1 or shape[1] % GROUP:
        w = rows_fn(dequantize(data, kind).reshape(shape).astype(np.float32))
        return {key: torch.from_numpy(np.ascontiguousarray(w))}
    if kind in INT4:
        levels, scale, low = (rows_fn(a) for a in int4_groups(data, kind, shape[0]))
        return {
            f"{key}_int4": torch.from_numpy(np.ascontiguousarray(pack(levels))),
            f"{key}_scale": torch.from_numpy(np.ascontiguousarray(scale)),
            f"{key}_low": torch.from_numpy(np.ascontiguousarray(low)),
        }
    w = rows_fn(dequantize(data, kind).reshape(shape).astype(np.float32))
    q, scale = quantize_rows(torch.from_numpy(np.ascontiguousarray(w)))
    return {f"{key}_int8": q, f"{key}_scale": scale}
