"""Preallocated key/value cache and the attention core both model families share.

The cache has `num_slots` rows of `max_seq` positions; a running sequence owns one slot. Each
forward writes the new keys/values at their positions, then attends over positions [0, S) of the
sequences' slots, with S = 1 + the largest position in the batch. One path serves prefill, a
chunk of a long prompt, and decode: the mask `key_pos <= query_pos` is built once per forward.
Shapes are per rank: `num_kv_heads` is this rank's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_seq: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_slots, num_kv_heads, max_seq, head_dim)  # (slots, kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_seq = num_slots, max_seq


@dataclass
class Batch:
    """Where the tokens of one forward sit. Built once per forward, read by every layer.

    positions: (B, T) position of each token. slots: (B,) cache slot of each row, or None for a
    forward without cache. mask: (B, 1, T, S) bool, or None when every key is visible.
    """

    positions: torch.Tensor
    slots: torch.Tensor | None
    mask: torch.Tensor | None
    span: int  # S: keys attended per row
    first: int | None  # slots == first + arange(B): read the cache through a view, not a gather

    @classmethod
    def make(cls, positions: torch.Tensor, cache: KVCache | None, slots: torch.Tensor | None) -> Batch:
        if cache is None:
            key_pos = positions[:, None, None, :]  # (B, 1, 1, T)
            mask = key_pos <= positions[:, None, :, None]
            return cls(positions, None, mask, positions.shape[1], None)
        if slots is None:
            slots = torch.arange(positions.shape[0], device=positions.device)
        span = int(positions.max()) + 1
        if span > cache.max_seq:
            raise ValueError(f"position {span - 1} is past the cache length {cache.max_seq}")
        key_pos = torch.arange(span, device=positions.device)[None, None, None, :]
        mask = key_pos <= positions[:, None, :, None]  # (B, 1, T, S)
        if bool(mask.all()):
            mask = None
        first = int(slots[0])
        run = bool((slots == first + torch.arange(len(slots), device=slots.device)).all())
        return cls(positions, slots, mask, span, first if run else None)

    @classmethod
    def fixed(cls, positions: torch.Tensor, span: int) -> Batch:
        """Rows are cache slots 0..B-1 reading keys [0, span) under a mask: no value is read back to
        the host, so the forward can be captured in a CUDA graph and replayed."""
        slots = torch.arange(positions.shape[0], device=positions.device)
        key_pos = torch.arange(span, device=positions.device)[None, None, None, :]
        return cls(positions, slots, key_pos <= positions[:, None, :, None], span, 0)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, cache: KVCache | None, layer: int
) -> torch.Tensor:
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) for the new tokens. Returns (B, T, H*D)."""
    b, t, h, d = q.shape
    if cache is None:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
    else:
        kc, vc = cache.k[layer], cache.v[layer]
        rows = batch.slots[:, None]  # (B, 1)
        kc[rows, :, batch.positions] = k  # (B, T, Hkv, D) into (slot, :, pos)
        vc[rows, :, batch.positions] = v
        if batch.first is not None:
            rows = slice(batch.first, batch.first + b)
            k, v = kc[rows, :, : batch.span], vc[rows, :, : batch.span]  # (B, Hkv, S, D)
        else:
            k, v = kc[batch.slots, :, : batch.span], vc[batch.slots, :, : batch.span]
    hkv = k.shape[1]
    if t == 1 and h != hkv:  # decode: the query heads sharing a KV head become its rows, no K/V copy
        out = F.scaled_dot_product_attention(q.view(b, hkv, h // hkv, d), k, v, attn_mask=batch.mask)
        return out.reshape(b, 1, h * d)  # (B, Hkv, H/Hkv, D) is (B, H, D) in head order
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=batch.mask, enable_gqa=h != hkv
    )  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, h * d)
