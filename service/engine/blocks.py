"""Which sequence holds which block of the paged KV cache, and the prefix cache (`BlockPool`).

A sequence takes blocks as its tokens arrive and gives them back when it ends. A full block is known by
a key: a keyed hash of its parent block's key and its own token ids, so one key names a whole prefix.
Full blocks stay in the prefix cache after their sequences end, and a new sequence starts from the
blocks of its longest cached prefix instead of computing them again (vLLM's automatic prefix caching).
A block is shared by reference count; a block no sequence holds but whose key is cached stays until
the pool needs it, least recently used first.

Blocks are handed out for the first time in increasing order (`KVCache` zeros a block on its first use
from that order). Block 0 is the null block (`model.kv_cache`) and is never handed out. The pool lives
on rank 0's host; the other ranks only see block tables.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.size = num_blocks, block_size
        self.unused = 1  # blocks [unused, num_blocks) were never handed out
        self.free: list[int] = []  # handed out before, now held by none and not cached
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block, for the full blocks of the prefix cache
        self.key: dict[int, bytes] = {}  # block -> its key in `cached`
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks held by none, least recently used first
        self.secret = os.urandom(16)  # keys a client cannot predict, so no prompt can be made to collide

    @property
    def capacity(self) -> int:
        """Blocks a sequence may hold at most (all but the null block)."""
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks `take` can hand out now."""
        return len(self.free) + self.num_blocks - self.unused + len(self.idle)

    def used(self) -> int:
        """Blocks held by sequences."""
        return self.capacity - self.available()

    def take(self) -> int | None:
        """A block for one sequence: a free one, else a never used one, else the least recently used idle
        one (it leaves the prefix cache); None when every block is held."""
        if self.free:
            block = self.free.pop()
        elif self.unused < self.num_blocks:
            block, self.unused = self.unused, self.unused + 1
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.cached[self.key.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence gives its blocks back: cached ones go idle (last in the LRU order), others free."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def keys(self, tokens: Sequence[int], parent: bytes = b"", start: int = 0) -> list[bytes]:
        """The keys of the full blocks of `tokens` from block `start` on, the block before it keyed `parent`."""
        out = []
        for i in range(start * self.size, len(tokens) - self.size + 1, self.size):
            h = hashlib.blake2b(parent, digest_size=16, key=self.secret)
            h.update(b"".join(t.to_bytes(4, "little") for t in tokens[i : i + self.size]))
            parent = h.digest()
            out.append(parent)
        return out

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached run of `keys` from the first, each now held once more by
        the caller."""
        blocks = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, key: bytes) -> None:
        """A block its sequence has filled enters the prefix cache (unless its key is cached already)."""
        if key not in self.cached and block not in self.key:
            self.cached[key], self.key[block] = block, key
