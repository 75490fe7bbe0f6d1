"""Continuous batching over one KV cache (`Batcher`): each step admits waiting sequences into free cache
slots, prefills prompt chunks within a per-step token budget (so a long prompt does not stall running
streams), and decodes one token for every sequence past its prompt; a finished or cancelled sequence
frees its slot at once.

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
from service.engine.sampler import Sampler
from service.engine.sequence import Sequence
from service.errors import ContextOverflow, RequestFailed


@dataclass(eq=False)
class Launched:
    """A greedy decode step on its way: the sequences it runs for, and every row's token, copied to the
    host once `ready` has passed (row i is cache slot i)."""

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

    def __init__(self, engine, cache: KVCache, step_tokens: int | None = None):
        """`engine`: the `service.engine.runner.Engine` whose model calls each step makes (not imported here:
        the engine builds batchers, so the import would go in a circle)."""
        self.engine, self.cache = engine, cache
        self.step_tokens = step_tokens or engine.prefill_chunk  # prompt tokens prefilled per step, at most
        self.free = list(range(cache.num_slots))  # a heap: the lowest slot goes first, so busy slots
        # tend to form one run that attention reads as a view instead of a gather
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.ahead: Launched | None = None  # the last decode step, when launched ahead of the host
        self.sampler = Sampler(cache.num_slots)

    def add(self, s: Sequence) -> None:
        """Queue a sequence; raises `InvalidRequest` for one the model cannot take (checked again here, on
        the engine thread, whatever the caller checked)."""
        self.engine.check_tokens(s.prompt)
        if s.length + s.params.max_tokens > self.cache.max_seq:
            raise ContextOverflow.too_long(self.cache.max_seq, s.length, s.params.max_tokens)
        self.waiting.append(s)

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, s: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        if s in self.running:
            self.running.remove(s)
            heapq.heappush(self.free, s.slot)
        elif s in self.waiting:
            self.waiting.remove(s)
        s.end(reason, error)

    def abort(self, requests: set[str]) -> None:
        """End the waiting and running sequences of these requests, finish reason "cancelled"."""
        for s in [s for s in self.waiting + self.running if s.request in requests]:
            self.finish(s, "cancelled")

    def step(self) -> None:
        self.waiting.sort(key=lambda s: (s.priority, s.arrival))
        while self.free and self.waiting:
            s = self.waiting.pop(0)
            s.slot = heapq.heappop(self.free)
            self.running.append(s)
        self.running.sort(key=lambda s: s.slot)
        decoding = [s for s in self.running if s.output]
        budget, chunks = self.step_tokens, []
        for s in self.running:
            left = len(s.prompt) - s.prefilled
            if left and budget > 0:
                chunks.append((s, min(left, budget)))
                budget -= chunks[-1][1]
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            going_on = any(len(s.output) + 1 < s.params.max_tokens for s in decoding)  # past the token on its way
            if not chunks and decoding == ahead.seqs and going_on:  # the same sequences decode on: chain
                self.ahead = self.engine.launch(decoding, self.cache, chained=True)
            self._take(ahead)
            if self.ahead is not None:
                return
            decoding = [s for s in self.running if s.output]
        if chunks:
            ready = []
            for s, row in self.engine.prefill(chunks, self.cache):
                if s.params.max_tokens == 0:  # the prompt only was to be scored
                    self.finish(s, "length")
                else:
                    ready.append((s, row))
            if ready:
                self._advance([s for s, _ in ready], torch.stack([row for _, row in ready]))
        if decoding and self.engine.chains(decoding):
            self.ahead = self.engine.launch(decoding, self.cache)
        elif decoding:
            self._advance(decoding, self.engine.decode(decoding, self.cache))

    def _take(self, step: Launched) -> None:
        """Record the tokens of a launched step. A sequence that finished meanwhile (cancelled, or done
        at the step before, when this one was chained) drops its token."""
        for s, token in zip(step.seqs, step.result()):
            if not s.done.is_set():
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
