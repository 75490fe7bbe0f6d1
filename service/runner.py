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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any


class EngineFailed(RuntimeError):
    pass


@dataclass
class Done:
    """The last item of a stream: the work's return value."""

    result: Any


class Runner:
    def __init__(self, on_fatal: Callable[[], None] = lambda: None):
        self.on_fatal = on_fatal
        self.lock = threading.Lock()
        self.failure: str | None = None

    def __call__(self, work: Callable[[], Any]) -> Any:
        if self.failure:
            raise EngineFailed(self.failure)
        with self.lock:
            try:
                return work()
            except ValueError:  # bad input (ContextOverflow included): the engine is fine
                raise
            except Exception as e:
                self.failure = f"engine failed: {type(e).__name__}: {e}"
                threading.Timer(0.5, self.on_fatal).start()
                raise EngineFailed(self.failure) from e

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
