"""Paged key/value cache and the attention core both model families share.

The cache is a pool of blocks of `block_size` positions, shared by every sequence. A row's positions
live in the blocks of its block table: position p sits in block `table[p // block_size]` at offset
`p % block_size`. Block 0 is the null block: table entries past a row's own blocks point at it, so a
padded token's write lands there and a read of it is masked. Which sequence holds which block is
decided on the host (`service.engine.blocks.BlockPool`); a forward gets each row's table.

The blocks are laid out in regions of `region` consecutive blocks, each region a (KV heads, positions,
head dim) slab: the layout attention reads fastest. A row whose blocks are the first blocks of one
region, in order (a sequence in its slot's home region: `BlockPool`), is read as that slab's first
positions, and a batch of such rows as a view of consecutive regions (or a copy of just those rows).
Rows anywhere else (a prefix shared from another region, a sequence longer than a region) are
gathered block by block into that layout, which costs a copy per forward.

Each forward writes the new keys/values at their positions, then attends over the first S positions
of every row: S covers the largest position in the batch, in whole blocks. One path serves prefill, a
chunk of a long prompt, and decode: the mask `key_pos <= query_pos` is built once per forward. Shapes
are per rank: `num_kv_heads` is this rank's share.

On a CPU the pool is taken with `torch.empty`, so memory is committed only as blocks are written, and
a block is zeroed when a forward first names it (the masked positions of a block are still multiplied
by zero, and 0 x NaN is NaN); every rank zeros the same blocks, from the tables alone. On CUDA the
pool is zeroed once, up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        region: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        """`num_blocks` a multiple of `region`."""
        self.args = (num_layers, num_blocks, block_size, region, num_kv_heads, head_dim, dtype)  # a rank's mirror
        device = torch.device(device)
        shape = (num_layers, num_blocks // region, num_kv_heads, region * block_size, head_dim)
        make = torch.empty if device.type == "cpu" else torch.zeros
        self.k, self.v = make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.region = num_blocks, block_size, region
        self.clean = torch.zeros(num_blocks, dtype=torch.bool) if device.type == "cpu" else None  # zeroed yet
        if self.clean is not None:
            self.zero(torch.tensor([0]))  # the null block

    def zero(self, blocks: torch.Tensor) -> None:
        """Zero the blocks of `blocks` (any shape) never zeroed before (a CPU pool's; a CUDA pool is zeros)."""
        if self.clean is None:
            return
        blocks = blocks.flatten().cpu()
        if not bool(self.clean[blocks].all()):
            blocks = blocks.unique()
            blocks = blocks[~self.clean[blocks]]
            self.clean[blocks] = True
            regions, offsets = blocks // self.region, blocks % self.region
            for t in (self.k, self.v):
                t.unflatten(3, (self.region, self.block_size))[:, regions, :, offsets] = 0
            if self.clean.all():
                self.clean = None  # nothing left to check

    @staticmethod
    def token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one position takes in every layer (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


@dataclass
class Batch:
    """Where the tokens of one forward sit. Built once per forward, read by every layer.

    positions: (B, T) position of each token. blocks: (B, N) each row's block table, N blocks
    covering `span` positions, or None for a forward without cache. where: (B x T x Hkv,) the rows that
    the new tokens' keys (and values) take in a layer's cache seen as (regions x Hkv x region positions,
    head dim): computed once, written by every layer with one `index_copy_`. mask: (B, 1, T, S) bool, or None
    when every key is visible. home: the regions whose first positions hold the rows (a slice when
    they are consecutive), or None when the rows' blocks are gathered. native_step: set by a model whose
    norms run our kernels (fp32 on a CPU), their instruction set: rows of up to NATIVE_QUERIES tokens (decode,
    speculation's verify) attend in one call of ours (`torch.ops.nlg.decode_attention`), each query the same
    way at any count, so that a verified draft token gets the bits decode would have given it.
    """

    positions: torch.Tensor
    blocks: torch.Tensor | None
    where: torch.Tensor | None
    mask: torch.Tensor | None
    span: int  # S: keys attended per row
    home: slice | torch.Tensor | None = None
    native_step: str | None = None  # short rows attend in our kernel with this instruction set

    @cached_property
    def lengths(self) -> torch.Tensor:
        """(B, T) keys each token attends to, once per forward: key j is position j, so p sees p + 1."""
        return self.positions + 1

    @classmethod
    def make(cls, positions: torch.Tensor, cache: KVCache | None, blocks: torch.Tensor | None) -> Batch:
        if cache is None:
            key_pos = positions[:, None, None, :]  # (B, 1, 1, T)
            mask = key_pos <= positions[:, None, :, None]
            return cls(positions, None, None, mask, positions.shape[1])
        n = int(positions.max()) // cache.block_size + 1
        if n > blocks.shape[1]:
            raise ValueError(f"position {int(positions.max())} is past the {blocks.shape[1]} blocks of the table")
        cache.zero(blocks[:, :n])
        batch = cls.fixed(positions, blocks[:, :n], cache)
        starts, blocks = batch.blocks[:, 0], batch.blocks
        run = starts[:, None] + torch.arange(n, device=starts.device)  # each row's region from its start
        own = ((blocks == run) | (blocks == 0)).all(1)  # its blocks, then null entries past them
        if n <= cache.region and bool((own & (starts % cache.region == 0) & (starts > 0)).all()):
            cache.zero(run)  # the region's positions past a row's blocks are read (masked): finite numbers
            regions = starts // cache.region
            first = int(regions[0])
            if bool((regions == first + torch.arange(len(regions), device=regions.device)).all()):
                batch.home = slice(first, first + len(regions))
            else:
                batch.home = regions
            batch.span = int(positions.max()) + 1  # read in place: no need to round up to whole blocks
            key_pos = torch.arange(batch.span, device=positions.device)[None, None, None, :]
            batch.mask = key_pos <= positions[:, None, :, None]
        if batch.mask is not None and batch.mask.all():
            batch.mask = None
        return batch

    @classmethod
    def fixed(cls, positions: torch.Tensor, blocks: torch.Tensor, cache: KVCache) -> Batch:
        """Rows read every position of the blocks of `blocks` (B, N), gathered, under a mask, and nothing
        is read back to the host: a CUDA graph can record the forward, and `torch.compile` trace it. The
        caller zeros the blocks first (`KVCache.zero`: a no-op on CUDA)."""
        size, (hkv, length) = cache.block_size, cache.k.shape[2:4]
        span = blocks.shape[1] * size
        at = blocks.gather(1, positions // size) * size + positions % size  # (B, T) among the pool's positions
        first = at // length * hkv * length + at % length  # (B, T) the row of head 0
        where = (first[..., None] + torch.arange(hkv, device=at.device) * length).flatten()  # (B x T x Hkv,)
        key_pos = torch.arange(span, device=positions.device)[None, None, None, :]
        return cls(positions, blocks, where, key_pos <= positions[:, None, :, None], span)


NATIVE_QUERIES = 16  # query tokens per row up to which our kernel attends (decode, speculation's verify)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, cache: KVCache | None, layer: int
) -> torch.Tensor:
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) for the new tokens. Returns (B, T, H*D)."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if cache is None:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
    else:
        kc, vc = cache.k[layer], cache.v[layer]  # (regions, Hkv, region x block_size, D)
        kc.view(-1, d).index_copy_(0, batch.where, k.reshape(-1, d))  # (B, T, Hkv, D) in (b, t, head) order
        vc.view(-1, d).index_copy_(0, batch.where, v.reshape(-1, d))
        if batch.home is not None:
            k, v = kc[batch.home, :, : batch.span], vc[batch.home, :, : batch.span]  # (B, Hkv, S, D)
        else:
            regions, offsets = batch.blocks // cache.region, batch.blocks % cache.region  # (B, N) each
            k, v = (
                c.unflatten(2, (cache.region, cache.block_size))[regions, :, offsets]  # (B, N, Hkv, block_size, D)
                .transpose(1, 2)
                .reshape(b, hkv, batch.span, d)
                for c in (kc, vc)
            )
    if t <= NATIVE_QUERIES and batch.native_step and cache is not None:
        q = q.view(b, t, hkv, h // hkv, d)
        out = torch.ops.nlg.decode_attention(q, k, v, batch.lengths, d**-0.5, batch.native_step)
        return out.reshape(b, t, h * d)
    if t == 1 and h != hkv:  # decode: the query heads sharing a KV head become its rows, no K/V copy
        out = F.scaled_dot_product_attention(q.view(b, hkv, h // hkv, d), k, v, attn_mask=batch.mask)
        return out.reshape(b, 1, h * d)  # (B, Hkv, H/Hkv, D) is (B, H, D) in head order
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=batch.mask, enable_gqa=h != hkv
    )  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, h * d)
