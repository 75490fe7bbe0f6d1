"""The server's engine thread: continuous batching for concurrent requests.

Requests hand their sequences to `submit` (returns at once; each sequence's `on_finish` says when it
ends: the async handle's way) or `run` (blocks until they end: batch jobs and command-line callers), and
one-off model calls to `call`; `abort(request)` ends a request's sequences at the next step. One thread,
started here, owns every model call, so tensor-parallel collectives come in the same order on every
rank. Each turn of its loop admits what arrived, ends what was aborted and runs one batcher step.

- Overload: more than `max_waiting` sequences queued -> `Overloaded` (HTTP 429 with Retry-After). A
  request of more sequences than `max_waiting` could never be admitted: `submit` refuses it with
  `TooLarge` (400), `run` admits it in parts.
- A request's own failure (a prompt the cache cannot take, its sampler, its callback) ends that
  request's sequences with its error; the engine goes on.
- Engine failure: an exception from a model call (a dead rank, a collective timeout, out of memory) is
  printed with its traceback, fails every queued and running sequence and every later request with
  `EngineFailed` (HTTP 503), and calls `on_fatal` once so that the server can answer what is in flight
  and exit non-zero.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from service.engine.batcher import Batcher
from service.engine.metrics import Metrics
from service.engine.runner import Engine
from service.engine.sequence import Completion, Sequence
from service.errors import EngineFailed, InvalidRequest, Overloaded, RequestFailed, TooLarge


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        slots: int = 16,
        context: int | None = None,
        max_waiting: int = 64,
        metrics: Metrics | None = None,
        on_fatal: Callable[[], None] = lambda: None,
    ):
        self.engine, self.max_waiting, self.on_fatal = engine, max_waiting, on_fatal
        self.metrics = metrics or Metrics(model_name="")
        self.batcher = Batcher(engine, engine.new_cache(slots, context or engine.context), slots)
        self.metrics.watch(self.state)
        self.cv = threading.Condition()
        self.inbox: list[Sequence] = []
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.aborts: set[str] = set()
        self.failure: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="nlg-engine", daemon=True)

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(30)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for the engine thread; raises `TooLarge`, `Overloaded` or `EngineFailed` at
        once, before any of them is queued."""
        with self.cv:
            self._check()
            if len(seqs) > self.max_waiting:
                raise TooLarge(
                    f"the request needs {len(seqs)} sequences and this server queues at most {self.max_waiting} "
                    "(--max-waiting): send fewer prompts"
                )
            queued = len(self.inbox) + len(self.batcher.waiting)
            if queued + len(seqs) > self.max_waiting:
                raise Overloaded(
                    f"{queued} sequences are already waiting (limit {self.max_waiting}); retry later",
                    retry_after=max(1, queued // self.batcher.slots),
                )
            self.inbox += seqs
            self.cv.notify()

    def run(self, seqs: list[Sequence]) -> list[Completion]:
        """Run sequences to the end from any thread (more than `max_waiting` of them in parts); raises
        the first one's error."""
        for start in range(0, len(seqs), self.max_waiting):
            part = seqs[start : start + self.max_waiting]
            self.submit(part)
            for s in part:
                s.done.wait()
            for s in part:
                if s.error is not None:
                    raise s.error
        return [s.completion() for s in seqs]

    def abort(self, request: str) -> None:
        """End the sequences of `request` (their `Sequence.request`) at the engine's next step, finish
        reason "cancelled"; from any thread, a no-op for a request that has ended."""
        with self.cv:
            self.aborts.add(request)
            self.cv.notify()

    def call(self, work: Callable[[], Any]) -> Future:
        """Run `work` on the engine thread between two steps; the future gets its result. An
        `InvalidRequest` it raises is the caller's; any other exception fails the engine."""
        future: Future = Future()
        with self.cv:
            self._check()
            self.calls.append((work, future))
            self.cv.notify()
        return future

    def _check(self) -> None:
        if self.failure:
            raise EngineFailed(self.failure)
        if self.stopping:
            raise EngineFailed("the engine is shutting down")

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.inbox or self.calls or self.aborts or self.batcher.busy() or self.stopping):
                    self.cv.wait()
                if self.stopping:  # whatever is left gets its answer: 503, the server is going down
                    self._end_all(EngineFailed("the engine is shutting down"), [])
                    return
                new, self.inbox = self.inbox, []
                calls, self.calls = self.calls, []
                aborts, self.aborts = self.aborts, set()
            for s in new:
                try:
                    self.batcher.add(s)
                except InvalidRequest as e:  # the request's input, not the engine's fault
                    s.end(error=e)
                except Exception as e:
                    s.end(error=RequestFailed(f"the request could not be queued: {type(e).__name__}: {e}"))
            self.batcher.abort(aborts)
            try:
                for work, future in calls:
                    try:
                        future.set_result(work())
                    except InvalidRequest as e:
                        future.set_exception(e)
                before = {id(s) for s in self.batcher.waiting}
                self.batcher.step()
            except Exception as e:
                self._fail(e, calls)
                return
            self._observe(before)

    def _observe(self, waiting_before: set[int]) -> None:
        m, now = self.metrics, time.monotonic()
        for s in self.batcher.running:
            if id(s) in waiting_before:  # admitted this step
                m.queue.observe(now - s.arrival)

    def state(self) -> dict[str, float]:
        """The engine's state as `Metrics.watch` exports it (read from another thread: lengths only)."""
        b = self.batcher
        return {
            "vllm:num_requests_running": len(b.running),
            "vllm:num_requests_waiting": len(b.waiting) + len(self.inbox),
            "vllm:kv_cache_usage_perc": b.pool.used() / b.pool.capacity,
            "nlg_kv_cache_blocks_free": b.pool.available(),
            "vllm:num_preemptions": b.preemptions,
            "vllm:prefix_cache_queries": b.queried,
            "vllm:prefix_cache_hits": b.hits,
        }

    def _fail(self, error: Exception, calls) -> None:
        self.failure = f"engine failed: {type(error).__name__}: {error}"
        print(f"nlg: error: {self.failure}", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()
        with self.cv:
            self._end_all(EngineFailed(self.failure), calls)
        self.on_fatal()

    def _end_all(self, error: EngineFailed, calls) -> None:
        """End every queued and running sequence and every pending call (`calls` taken off the queue
        already, and those still on it) with `error`; the caller holds `cv`."""
        for s in self.inbox + self.batcher.waiting + self.batcher.running:
            s.end(error=error)
        for _, future in calls + self.calls:
            if not future.done():
                future.set_exception(error)
        self.inbox, self.calls = [], []
