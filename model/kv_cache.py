"""Paged key/value cache and the attention core both model families share.

The cache is a pool of blocks of `block_size` positions per layer, shared by every sequence. A row's
positions live in the blocks of its block table: position p sits in block `table[p // block_size]`
at offset `p % block_size`. Block 0 is the null block: table entries past a row's own blocks point
at it, so a padded token's write lands there and a read of it is masked. Which sequence holds which
block is decided on the host (`service.engine.blocks.BlockPool`); a forward gets each row's table.

Each forward writes the new keys/values at their positions, then attends over the first S positions
of every row: S covers the largest position in the batch, in whole blocks. One row whose blocks are
consecutive is read as a view of the pool; otherwise the rows' blocks are gathered. One path serves
prefill, a chunk of a long prompt, and decode: the mask `key_pos <= query_pos` is built once per
forward. Shapes are per rank: `num_kv_heads` is this rank's share.

On a CPU the pool is taken with `torch.empty`, so memory is committed only as blocks are written, and
a block is zeroed when it is first used (the masked positions of a block are still multiplied by
zero, and 0 x NaN is NaN). Blocks are used for the first time in increasing order (`BlockPool`), so
every rank zeros the same blocks from the tables alone. On CUDA the pool is zeroed once, up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        device = torch.device(device)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        make = torch.empty if device.type == "cpu" else torch.zeros
        self.k, self.v = make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.zeroed = 0 if device.type == "cpu" else num_blocks  # blocks [0, zeroed) hold finite numbers
        self.zero_below(1)  # the null block

    def zero_below(self, top: int) -> None:
        """Zero the blocks below `top` that were never zeroed."""
        if top > self.zeroed:
            self.k[:, self.zeroed : top] = 0
            self.v[:, self.zeroed : top] = 0
            self.zeroed = top

    @staticmethod
    def token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one position takes in every layer (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


@dataclass
class Batch:
    """Where the tokens of one forward sit. Built once per forward, read by every layer.

    positions: (B, T) position of each token. blocks: (B, N) each row's block table, N blocks
    covering `span` positions, or None for a forward without cache. where: (B, T) index of each new
    token in the pool's flattened (blocks x block_size) positions. mask: (B, 1, T, S) bool, or None
    when every key is visible.
    """

    positions: torch.Tensor
    blocks: torch.Tensor | None
    where: torch.Tensor | None
    mask: torch.Tensor | None
    span: int  # S: keys attended per row
    run: int | None  # one row whose blocks are run, run + 1, ...: read the cache through a view

    @classmethod
    def make(cls, positions: torch.Tensor, cache: KVCache | None, blocks: torch.Tensor | None) -> Batch:
        if cache is None:
            key_pos = positions[:, None, None, :]  # (B, 1, 1, T)
            mask = key_pos <= positions[:, None, :, None]
            return cls(positions, None, None, mask, positions.shape[1], None)
        size = cache.block_size
        n = int(positions.max()) // size + 1
        if n > blocks.shape[1]:
            raise ValueError(f"position {int(positions.max())} is past the {blocks.shape[1]} blocks of the table")
        blocks = blocks[:, :n]
        run = None
        if len(blocks) == 1 and (n == 1 or bool((blocks[0].diff() == 1).all())):
            run = int(blocks[0, 0])
        batch = cls.fixed(positions, blocks, cache)
        if batch.mask.all():
            batch.mask = None
        batch.run = run
        return batch

    @classmethod
    def fixed(cls, positions: torch.Tensor, blocks: torch.Tensor, cache: KVCache) -> Batch:
        """Rows read every position of the blocks of `blocks` (B, N) under a mask, and nothing is read
        back to the host (a CUDA pool is zeroed already): the forward can be captured in a CUDA graph."""
        if cache.zeroed < cache.num_blocks:
            cache.zero_below(int(blocks.max()) + 1)
        block_size = cache.block_size
        span = blocks.shape[1] * block_size
        where = blocks.gather(1, positions // block_size) * block_size + positions % block_size
        key_pos = torch.arange(span, device=positions.device)[None, None, None, :]
        return cls(positions, blocks, where, key_pos <= positions[:, None, :, None], span, None)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, cache: KVCache | None, layer: int
) -> torch.Tensor:
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) for the new tokens. Returns (B, T, H*D)."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if cache is None:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
    else:
        kc, vc = cache.k[layer], cache.v[layer]  # (blocks, block_size, Hkv, D)
        kc.view(-1, hkv, d)[batch.where] = k
        vc.view(-1, hkv, d)[batch.where] = v
        if batch.run is not None:
            n = batch.span // cache.block_size
            k, v = kc[batch.run : batch.run + n], vc[batch.run : batch.run + n]
        else:
            k, v = kc[batch.blocks], vc[batch.blocks]  # (B, N, block_size, Hkv, D)
        k, v = k.reshape(b, batch.span, hkv, d).transpose(1, 2), v.reshape(b, batch.span, hkv, d).transpose(1, 2)
    if t == 1 and h != hkv:  # decode: the query heads sharing a KV head become its rows, no K/V copy
        out = F.scaled_dot_product_attention(q.view(b, hkv, h // hkv, d), k, v, attn_mask=batch.mask)
        return out.reshape(b, 1, h * d)  # (B, Hkv, H/Hkv, D) is (B, H, D) in head order
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=batch.mask, enable_gqa=h != hkv
    )  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, h * d)
