"""Continuous batching over one paged KV cache (`Batcher`): each step gives the running sequences the
blocks their next tokens need, admits waiting sequences while a slot and blocks are free, prefills
prompt chunks within a per-step token budget (so a long prompt does not stall running streams), and
decodes one token for every sequence past its prompt.

Blocks (`service.engine.blocks.BlockPool`): a new sequence starts from the cached blocks of its longest
cached prefix and prefills only the rest (unless that prefix is short, under `AWAY_HIT` tokens or half
the prompt, and lies away from any free slot's home region, where reading it would cost a gather at
every step); each block it fills enters the prefix cache (unless the engine runs without prefix caching,
or the request wants prompt log-probabilities); a finished or cancelled sequence gives its blocks back
at once. When a running sequence needs a block and none is left, the youngest running sequence is
preempted: it gives its blocks back and waits again, and when it is admitted again it prefills its
prompt and output so far (most of it found in the prefix cache, unless evicted meanwhile), as vLLM's
recompute preemption does. A request that could never fit the whole cache is refused when it is added.

Prompt-lookup speculation (`Engine.prompt_lookup`): when every decoding sequence is greedy (processors
but the count penalties allowed) and wants no log-probabilities, each one's draft
(`service.engine.lookup`) is verified in one forward and the tokens the model agrees with are taken,
with its own next token after them: the same output in fewer steps.

On the CUDA-graph path greedy decode steps are launched ahead (`Engine.launch` returns a `Launched`): a
step over the same sequences as the step before is started before the host reads that step's tokens,
so the host's work per token (callbacks, stop checks, streaming) runs while the GPU computes the next.

A request's own failure on this thread (its sampler, its `on_token` callback) ends that sequence with
`RequestFailed` and frees its slot; the step goes on for the others. Only the model's calls can fail
the engine.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from model.kv_cache import KVCache
from service.engine.blocks import BlockPool
from service.engine.lookup import draft
from service.engine.sampler import Sampler
from service.engine.sampling import MIN_TEMPERATURE
from service.engine.sequence import Sequence
from service.errors import ContextOverflow, RequestFailed

AWAY_HIT = 128  # tokens a cached prefix away from a free home must have to be used (and half the prompt)


@dataclass(eq=False)
class Launched:
    """A greedy decode step on its way: the sequences it runs for, and every row's token, copied to the
    host once `ready` has passed (row i is slot i)."""

    seqs: list[Sequence]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None

    def result(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        rows = self.tokens.tolist()
        return [rows[s.slot] for s in self.seqs]


class Batcher:
    """Continuous batching over one cache: the sequences waiting for a slot and those holding one."""

    def __init__(self, engine, cache: KVCache, slots: int, pool: BlockPool | None = None):
        """`engine`: the `service.engine.runner.Engine` whose model calls each step makes (not imported here:
        the engine builds batchers, so the import would go in a circle). `pool`: the cache's blocks (a new
        pool when None: nothing is cached yet)."""
        self.engine, self.cache = engine, cache
        self.pool = pool or BlockPool(cache.num_blocks, cache.block_size, cache.region, slots)
        self.step_tokens = engine.prefill_chunk  # prompt tokens prefilled per step, at most
        self.slots = slots
        self.free = list(range(slots))  # a heap: the lowest slot goes first, so that a decode step's rows
        # are the low slots (the CUDA graphs' row buckets)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.ahead: Launched | None = None  # the last decode step, when launched ahead of the host
        self.sampler = Sampler(slots)
        self.admissions = 0
        self.preemptions = 0
        self.queried = self.hits = 0  # prompt tokens looked up in the prefix cache, and those found
        self.drafted = self.accepted = 0  # prompt-lookup draft tokens verified, and those taken

    def add(self, s: Sequence) -> None:
        """Queue a sequence; raises `InvalidRequest` for one the model cannot take (checked again here, on
        the engine thread, whatever the caller checked)."""
        self.engine.check_tokens(s.prompt)
        self.engine.check_fits(s.length, s.params.max_tokens)
        need, size = s.length + s.params.max_tokens, self.pool.size
        if -(-need // size) > self.pool.capacity:
            raise ContextOverflow(
                f"the request needs {need} tokens of KV cache ({s.length} in the prompt, {s.params.max_tokens} "
                f"in the completion) and the whole cache holds {self.pool.capacity * size} (--kv-cache-memory): "
                "shorten the prompt or lower max_tokens",
                param="messages",
            )
        self.waiting.append(s)

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, s: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        if s in self.running:
            self._evict(s)
        elif s in self.waiting:
            self.waiting.remove(s)
        s.end(reason, error)

    def abort(self, requests: set[str]) -> None:
        """End the waiting and running sequences of these requests, finish reason "cancelled"."""
        for s in [s for s in self.waiting + self.running if s.request in requests]:
            self.finish(s, "cancelled")

    def step(self) -> None:
        if self.ahead is not None and self._chain():
            return
        self._admit()
        work = self._plan()
        chunks = [(s, n) for s, n in work if not self._decoding(s)]
        decoding = [s for s, _ in work if self._decoding(s)]
        if chunks:
            done = self.engine.prefill(chunks, self.cache)
            for s, _ in chunks:
                self._register(s)
            ready = []
            for s, row in done:
                if s.params.max_tokens == 0:  # the prompt only was to be scored
                    self.finish(s, "length")
                else:
                    ready.append((s, row))
            if ready:
                self._advance([s for s, _ in ready], torch.stack([row for _, row in ready]))
        if decoding and self.engine.chains(decoding):
            self.ahead = self.engine.launch(decoding, self.cache)
        elif decoding and any(drafts := self._drafts(decoding)):
            self._speculate(list(zip(decoding, drafts)))
        elif decoding:
            logits = self.engine.decode(decoding, self.cache)
            for s in decoding:
                s.prefilled = s.length
                self._register(s)
            self._advance(decoding, logits)

    def _drafts(self, decoding: list[Sequence]) -> list[list[int]]:
        """Each decoding sequence's prompt-lookup draft (`service.engine.lookup`), with the blocks of its
        positions. All [] when speculation is off (`Engine.prompt_lookup` 0), for steps of more rows than
        `Engine.lookup_rows` (verifying many rows' drafts costs more than it saves), or when a sequence
        samples, has a count penalty or wants log-probabilities; [] for a sequence near the end of its
        context or max_tokens, or when no block is free."""
        k, engine = self.engine.prompt_lookup, self.engine
        plain = all(  # greedy, with no processor that needs the sampler's per-slot counts
            s.params.temperature < MIN_TEMPERATURE and not s.params.counts_tokens and s.params.logprobs is None
            for s in decoding
        )
        if not k or len(decoding) > engine.lookup_rows or not plain:
            return [[] for _ in decoding]
        out = []
        for s in decoding:
            room = min(k, s.params.max_tokens - len(s.output) - 1)  # the step adds a token after the draft
            near_end = s.length + 2 * (k + 1 + self.pool.size) >= engine.context  # padding off the last position
            d = [] if near_end else draft(s.tokens(), room)
            out.append(d if d and self._grow(s, s.length + len(d), preempt=False) else [])
        return out

    def _speculate(self, rows: list[tuple[Sequence, list[int]]]) -> None:
        """Verify the drafts in one forward and take, for each sequence, the draft tokens the model agrees
        with (`Sampler.verified`), then the model's own next token: 1 to len(draft) + 1 tokens, the same
        tokens plain decoding gives. The keys and values written for rejected draft tokens lie past the sequence's
        length, where the next forward writes over them before any query reads them."""
        for (s, d), logits in zip(rows, self.engine.verify(rows, self.cache)):
            taken = self.sampler.verified(s, logits, d)
            agreed = len(taken) - 1
            self.drafted, self.accepted = self.drafted + len(d), self.accepted + agreed
            s.prefilled = s.length + agreed  # the fed tokens now in the cache: all but the last one taken
            for token in taken:
                self._record(s, token)
                if s.done.is_set():
                    break
            else:
                self._register(s)

    @staticmethod
    def _decoding(s: Sequence) -> bool:
        """Past its prompt, with every token but the last in the cache: it decodes one token a step."""
        return bool(s.output) and s.prefilled == s.length - 1

    def _chain(self) -> bool:
        """Take the tokens of the step launched ahead; first, when every running sequence decodes on, none
        could be admitted and each has a block for the position the next step writes, launch that step
        chained to it. Returns whether it did."""
        ahead, self.ahead = self.ahead, None
        going_on = any(len(s.output) + 1 < s.params.max_tokens for s in ahead.seqs)  # past the token on its way
        if (
            self.running == ahead.seqs
            and going_on
            and not (self.waiting and self.free)
            and all(self._grow(s, s.length + 1, preempt=False) for s in ahead.seqs)
        ):
            self.ahead = self.engine.launch(ahead.seqs, self.cache, chained=True)
        self._take(ahead)
        return self.ahead is not None

    def _admit(self) -> None:
        """Give free slots to waiting sequences, first come first served by priority, while the blocks of
        each one's first chunk are free (past its cached prefix)."""
        self.waiting.sort(key=lambda s: (s.priority, s.arrival))
        size = self.pool.size
        while self.free and self.waiting:
            s = self.waiting[0]
            tokens = s.tokens()
            keys, hit = [], []
            looked = self.engine.prefix_caching and s.params.prompt_logprobs is None  # (those need every logit)
            if looked:
                keys = self.pool.keys(tokens[: len(tokens) - 1])  # at least one token is computed
                hit = self.pool.match(keys)
            home = self._home_of(hit)
            if home is None and (2 * len(hit) * size < len(tokens) or len(hit) * size < AWAY_HIT):
                # a short prefix away from home: computing it again costs less than reading the sequence
                # (and its batch) through a gather at every step
                self.pool.release(hit)
                hit = []
            start = len(hit) * size
            first = min(len(tokens) - start, self.step_tokens)
            if -(-(start + first) // size) - len(hit) > self.pool.available():
                self.pool.release(hit)
                return
            self.waiting.pop(0)
            self.queried, self.hits = self.queried + looked * len(tokens), self.hits + start
            s.blocks, s.keys, s.prefilled = hit, keys[: len(hit)], start
            if home is None:
                s.slot = heapq.heappop(self.free)
            else:
                self.free.remove(home)
                heapq.heapify(self.free)
                s.slot = home
            self.admissions += 1
            s.admitted = self.admissions
            self.running.append(s)
        self.running.sort(key=lambda s: s.slot)

    def _home_of(self, hit: list[int]) -> int | None:
        """The free slot whose home region starts with the cached blocks `hit` (a sequence there is read
        in place), or None."""
        slot = hit[0] // self.pool.region - 1 if hit and hit[0] % self.pool.region == 0 else -1
        return slot if slot in self.free else None

    def _plan(self) -> list[tuple[Sequence, int]]:
        """The tokens each running sequence feeds this step (1 when it decodes, else a prompt chunk within
        the step's budget), each with the blocks they need; oldest first, so a shortage preempts the
        youngest."""
        budget, work = self.step_tokens, []
        for s in sorted(self.running, key=lambda s: s.admitted):
            if s not in self.running:  # preempted meanwhile
                continue
            decoding = self._decoding(s)
            n = 1 if decoding else min(s.length - s.prefilled, budget)
            if n and self._grow(s, s.prefilled + n):
                work.append((s, n))
                budget -= 0 if decoding else n
        return sorted(((s, n) for s, n in work if s in self.running), key=lambda w: w[0].slot)

    def _grow(self, s: Sequence, tokens: int, preempt: bool = True) -> bool:
        """Blocks for the first `tokens` positions of `s`; when none is left, preempt the youngest running
        sequence (or, not `preempt`, give up). False when `s` itself was preempted or it gave up."""
        while len(s.blocks) * self.pool.size < tokens:
            n = len(s.blocks)
            block = self.pool.take(self.pool.home(s.slot) + n if n < self.pool.region else None)
            if block is not None:
                s.blocks.append(block)
                continue
            if not preempt:
                return False
            victim = max(self.running, key=lambda r: r.admitted)
            self._evict(victim)
            victim.prefilled = 0
            if not victim.output:
                victim.prompt_logprobs.clear()  # computed again from the first token
            self.waiting.append(victim)
            self.preemptions += 1
            if victim is s:
                return False
        return True

    def _evict(self, s: Sequence) -> None:
        """`s` leaves the running sequences: its slot and its blocks are free."""
        self.running.remove(s)
        heapq.heappush(self.free, s.slot)
        self.pool.release(s.blocks)
        s.blocks, s.keys = [], []

    def _register(self, s: Sequence) -> None:
        """Put the blocks `s` has filled since the last call into the prefix cache."""
        full = s.prefilled // self.pool.size
        if self.engine.prefix_caching and full > len(s.keys):
            new = self.pool.keys(s.tokens()[: full * self.pool.size], s.keys[-1] if s.keys else b"", len(s.keys))
            for block, key in zip(s.blocks[len(s.keys) :], new):
                self.pool.register(block, key)
            s.keys += new

    def _take(self, step: Launched) -> None:
        """Record the tokens of a launched step. A sequence that finished meanwhile (cancelled, or done
        at the step before, when this one was chained) drops its token."""
        for s, token in zip(step.seqs, step.result()):
            if not s.done.is_set():
                s.prefilled = s.length
                self._register(s)
                self._record(s, token)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for s, token in zip(seqs, self.sampler.pick(seqs, logits)):
            if isinstance(token, RequestFailed):
                self.finish(s, error=token)
            else:
                self._record(s, token)

    def _record(self, s: Sequence, token: int) -> None:
        try:
            finished = self.engine.append(s, token)
        except Exception as e:  # the request's own callback (detokenizing, streaming): fails it alone
            self.finish(s, error=RequestFailed(f"the request failed while taking its tokens: {type(e).__name__}: {e}"))
            return
        if finished:
            self.finish(s)
