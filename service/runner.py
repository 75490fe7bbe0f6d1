"""Engine work on behalf of the HTTP handlers.

One generation at a time (a lock: collectives of a tensor-parallel model must come in the same order
on every rank). An engine failure that is not the caller's fault (a dead rank, a collective timeout,
out of memory) is fatal: every later call gets `EngineFailed` (503) and `on_fatal` runs once, which
`nlg serve` uses to exit non-zero. `stream` runs a generation on a thread and yields its text as it
comes; when the consumer goes away (client disconnect), generation stops at the next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from service.metrics import Metrics


class EngineFailed(RuntimeError):
    pass


@dataclass
class Done:
    """The last item of a stream: the work's return value."""

    result: Any


class Runner:
    def __init__(self, on_fatal: Callable[[], None] = lambda: None, metrics: Metrics | None = None):
        self.on_fatal, self.metrics = on_fatal, metrics or Metrics()
        self._unobserved = Metrics()  # where probes record
        self.lock = threading.Lock()
        self.failure: str | None = None

    def __call__(self, work: Callable[[], Any], observe: bool = True) -> Any:
        """Run `work` with the engine to itself; `observe=False` keeps it out of the request metrics."""
        if self.failure:
            raise EngineFailed(self.failure)
        m, queued = self.metrics if observe else self._unobserved, time.perf_counter()
        m.waiting.inc()
        try:
            self.lock.acquire()
        finally:
            m.waiting.dec()
        m.queue.observe(time.perf_counter() - queued)
        m.running.inc()
        try:
            return work()
        except ValueError:  # bad input (ContextOverflow included): the engine is fine
            raise
        except Exception as e:
            self.failure = f"engine failed: {type(e).__name__}: {e}"
            threading.Timer(0.5, self.on_fatal).start()
            raise EngineFailed(self.failure) from e
        finally:
            m.running.dec()
            m.latency.observe(time.perf_counter() - queued)
            self.lock.release()

    async def stream(self, work: Callable[[Callable[[Any], None], Callable[[], bool]], Any]) -> AsyncIterator[Any]:
        """Run `work(push, cancelled)` on a thread; yield what it pushes, then `Done(result)`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value: Any) -> None:
            if cancelled.is_set():
                return  # nobody is listening any more (and the loop may be gone)
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def job() -> None:
            try:
                put("done", self(lambda: work(lambda item: put("item", item), cancelled.is_set)))
            except BaseException as e:  # handed to the consumer, raised there
                put("error", e)

        threading.Thread(target=job, daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                yield value if kind == "item" else Done(value)
                if kind == "done":
                    return
        finally:
            cancelled.set()
