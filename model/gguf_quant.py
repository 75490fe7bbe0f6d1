"""GGUF quantized tensors in the project's own quantized forms (`parallel.stored` makes them layers), never
inflated whole.

- Q4_0, Q4_1, Q4_K: 16 levels per group of 32 weights with one scale and one offset per group, which is
  exactly our int4 form (GROUP 32): converted without loss, levels packed two per byte.
  Q4_0: w = (q - 8) d; Q4_1: w = q d + m; Q4_K: super-blocks of 256 with eight 6-bit sub-scales and
  sub-mins, w = d sc q - dmin m.
- Q8_0, Q5_0, Q5_1, Q5_K (groups of 32) and Q6_K (groups of 16): int8 levels with the block's scale and
  offset per group, also without loss. The levels are read back from gguf's own dequantization and the
  block headers' scales (level = (w - offset) / scale is exact: each w is one rounding-free product).
- F32, F16, BF16, and every 1-D tensor: fp32.

Stored keys beside a weight key K: `K_int4` (uint8 (out, in / 2): column 2j in the low nibble, 2j + 1
in the high one) or `K_int8` (int8 (out, in)), then `K_scale` and `K_low` (fp32 (out, groups)):
w = level * scale + low, group by group. On our CPU kernels both forms run as stored (`parallel.stored`:
Q8_0 as int8, the 5-6 bit types as int6); elsewhere the loader re-quantizes an int8 form for the mode asked,
and it dequantizes either form for `--quantize none`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K, dequantize

INT4 = {T.Q4_0, T.Q4_1, T.Q4_K}
INT8 = {T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K}
FLOAT = {T.F32, T.F16, T.BF16}


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def int8_groups(data: np.ndarray, kind: T, shape: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels int8 (rows, cols), scale, low fp32 (rows, groups)) with levels * scale + low equal to gguf's
    own dequantization of the 5-8 bit type `kind`."""
    rows = shape[0]
    w = dequantize(data, kind).reshape(rows, -1)
    if kind == T.Q6_K:
        blocks = data.reshape(-1, 210)
        scale, low = _f16(blocks[:, 208:210]) * blocks[:, 192:208].copy().view(np.int8).astype(np.float32), 0
    elif kind == T.Q5_K:
        blocks = data.reshape(-1, 176)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        scale, low = _f16(blocks[:, 0:2]) * sc.astype(np.float32), -(_f16(blocks[:, 2:4]) * m.astype(np.float32))
    else:
        blocks = data.reshape(-1, {T.Q8_0: 34, T.Q5_0: 22, T.Q5_1: 24}[kind])
        scale, low = _f16(blocks[:, 0:2]), (_f16(blocks[:, 2:4]) if kind == T.Q5_1 else 0)
    scale = scale.reshape(rows, -1)
    low = np.broadcast_to(np.asarray(low, dtype=np.float32), (blocks.shape[0], scale.size // blocks.shape[0]))
    low = low.reshape(rows, -1)
    per = w.shape[1] // scale.shape[1]
    grouped = (w.reshape(rows, -1, per) - low[..., None]) / np.where(scale == 0, 1, scale)[..., None]
    return np.rint(grouped).astype(np.int8).reshape(rows, -1), scale, np.ascontiguousarray(low)


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
    if kind in INT4 and len(shape) == 2:
        levels, scale, low = (rows_fn(a) for a in int4_groups(data, kind, shape[0]))
        levels, form = pack(levels), "int4"
    elif kind in INT8 and len(shape) == 2:
        levels, scale, low = (rows_fn(a) for a in int8_groups(data, kind, shape))
        form = "int8"
    else:
        w = rows_fn(dequantize(data, kind).reshape(shape).astype(np.float32))
        return {key: torch.from_numpy(np.ascontiguousarray(w))}
    parts = {f"{key}_{form}": levels, f"{key}_scale": scale, f"{key}_low": low}
    return {k: torch.from_numpy(np.array(v, order="C")) for k, v in parts.items()}  # a copy: owned, writable
