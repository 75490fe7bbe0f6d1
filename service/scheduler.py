"""The server's engine thread: continuous batching for concurrent requests.

Request threads hand their sequences to `run` (which blocks until they finish) or a one-off model
call to `call`; one thread, started here, owns every model call, so tensor-parallel collectives come
in the same order on every rank. Each turn of its loop admits what arrived and runs one batcher step.

Overload: more than `max_waiting` sequences queued -> `Overloaded` (HTTP 429 with Retry-After).
Failure: an exception from the model (a dead rank, a collective timeout, out of memory) fails every
queued and running sequence with `EngineFailed` (HTTP 503), every later request too, and calls
`on_fatal` once so the server can exit non-zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from service.batcher import Batcher
from service.engine import Engine
from service.metrics import Metrics
from service.sequence import Completion, Sequence


class EngineFailed(RuntimeError):
    pass


class Overloaded(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


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
        self.metrics = metrics or Metrics()
        self.batcher = Batcher(engine, engine.new_cache(slots, context or engine.context))
        self.cv = threading.Condition()
        self.inbox: list[Sequence] = []
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.failure: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="nlg-engine", daemon=True)

    def start(self) -> Scheduler:
        self.engine.scheduler = self
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(30)
        self.engine.scheduler = None

    def run(self, seqs: list[Sequence]) -> list[Completion]:
        with self.cv:
            self._check()
            queued = len(self.inbox) + len(self.batcher.waiting)
            if queued + len(seqs) > self.max_waiting:
                raise Overloaded(
                    f"{queued} sequences are already waiting (limit {self.max_waiting}); retry later",
                    retry_after=max(1, queued // max(1, self.batcher.cache.num_slots)),
                )
            self.inbox += seqs
            self.cv.notify()
        for s in seqs:
            s.done.wait()
        for s in seqs:
            if isinstance(s.error, ValueError):
                raise s.error
            if s.error is not None:
                raise EngineFailed(self.failure or str(s.error)) from s.error
        return [s.completion() for s in seqs]

    def call(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the engine thread between two steps; returns its result."""
        future: Future = Future()
        with self.cv:
            self._check()
            self.calls.append((work, future))
            self.cv.notify()
        return future.result()

    def _check(self) -> None:
        if self.failure:
            raise EngineFailed(self.failure)
        if self.stopping:
            raise EngineFailed("the engine is shutting down")

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.inbox or self.calls or self.batcher.busy() or self.stopping):
                    self.cv.wait()
                if self.stopping:
                    return
                new, self.inbox = self.inbox, []
                calls, self.calls = self.calls, []
            for s in new:
                try:
                    self.batcher.add(s)
                except ValueError as e:  # does not fit the cache: that request's error, not the engine's
                    s.error = e
                    s.done.set()
            try:
                for work, future in calls:
                    try:
                        future.set_result(work())
                    except ValueError as e:  # the caller's input, not the engine
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
        m.running.set(len(self.batcher.running))
        m.waiting.set(len(self.batcher.waiting) + len(self.inbox))

    def _fail(self, error: Exception, calls) -> None:
        with self.cv:
            self.failure = f"engine failed: {type(error).__name__}: {error}"
            for s in self.inbox + self.batcher.waiting + self.batcher.running:
                s.error = error
                s.done.set()
            for _, future in calls + self.calls:
                if not future.done():
                    future.set_exception(EngineFailed(self.failure))
        self.on_fatal()
