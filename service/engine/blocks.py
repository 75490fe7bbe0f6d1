"""Which sequence holds which block of the paged KV cache, and the prefix cache (`BlockPool`).

A sequence takes blocks as its tokens arrive and gives them back when it ends. A full block is known by
a key: a keyed hash of its parent block's key and its own token ids, so one key names a whole prefix.
Full blocks stay in the prefix cache after their sequences end, and a new sequence starts from the
blocks of its longest cached prefix instead of computing them again (vLLM's automatic prefix caching).
A block is shared by reference count; a block no sequence holds but whose key is cached stays until
the pool needs it, least recently used first.

Where a block sits matters to speed (`model.kv_cache`): the blocks come in regions, and slot i's home
is region i + 1 (region 0 holds the null block, block 0, which is never handed out). A sequence asks
for the next block of its slot's home; when that one is held by another, it gets a free block outside
every home first, then the free home block least likely to be wanted soon (the last of its region),
then the least recently used idle block. A sequence wholly in its home is read without a copy.
The pool lives on rank 0's host; the other ranks only see block tables.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections import OrderedDict
from collections.abc import Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, region: int, slots: int):
        self.num_blocks, self.size, self.region, self.slots = num_blocks, block_size, region, slots
        self.free = set(range(1, num_blocks))  # held by none and not cached
        self.order = [(self._rank(b), b) for b in self.free]  # a heap over `free` (stale entries skipped)
        heapq.heapify(self.order)
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block, for the full blocks of the prefix cache
        self.key: dict[int, bytes] = {}  # block -> its key in `cached`
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks held by none, least recently used first
        self.secret = os.urandom(16)  # keys a client cannot predict, so no prompt can be made to collide

    def _rank(self, block: int) -> tuple[bool, int]:
        """Which free block goes first when no particular one is asked for: outside the homes, then the
        last of a home region."""
        region, offset = divmod(block, self.region)
        home = 1 <= region <= self.slots
        return home, -offset if home else offset

    def home(self, slot: int) -> int:
        """The first block of a slot's home region."""
        return (slot + 1) * self.region

    @property
    def capacity(self) -> int:
        """Blocks a sequence may hold at most (all but the null block)."""
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks `take` can hand out now."""
        return len(self.free) + len(self.idle)

    def used(self) -> int:
        """Blocks held by sequences."""
        return self.capacity - self.available()

    def take(self, want: int | None = None) -> int | None:
        """A block for one sequence: `want` when no other holds it (an idle one leaves the prefix cache),
        else a free one in `_rank` order, else the least recently used idle one; None when every block
        is held."""
        if want in self.free:
            self.free.discard(want)
        elif want in self.idle:
            del self.idle[want]
            del self.cached[self.key.pop(want)]
        else:
            want = None
            while self.order and want is None:
                _, block = heapq.heappop(self.order)
                if block in self.free:
                    self.free.discard(block)
                    want = block
            if want is None and self.idle:
                want, _ = self.idle.popitem(last=False)
                del self.cached[self.key.pop(want)]
            if want is None:
                return None
        self.refs[want] = 1
        return want

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence gives its blocks back: cached ones go idle (last in the LRU order), others free."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key:
                    self.idle[block] = None
                else:
                    self.free.add(block)
                    heapq.heappush(self.order, (self._rank(block), block))
        if len(self.order) > 2 * self.num_blocks:  # entries of blocks since taken by name: start afresh
            self.order = [(self._rank(b), b) for b in self.free]
            heapq.heapify(self.order)

    def keeps(self, block: int, unless: list[bytes]) -> bool:
        """Whether `block` holds a cached block no sequence holds, keyed other than `unless` (taking it would
        evict another prompt's block from the cache)."""
        return block in self.idle and self.key[block] not in unless

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
