"""Streaming a blocking generation to an async consumer.

`stream(work)` runs `work(push, cancelled)` on a thread and yields what it pushes, then `Done(result)`.
When the consumer goes away (the HTTP client disconnected), `cancelled()` turns true and the engine
drops the sequence at its next step, freeing its slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Done:
    """The last item of a stream: the work's return value."""

    result: Any


async def stream(work: Callable[[Callable[[Any], None], Callable[[], bool]], Any]) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def put(kind: str, value: Any) -> None:
        if cancelled.is_set():
            return  # nobody is listening any more (and the loop may be gone)
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def job() -> None:
        try:
            put("done", work(lambda item: put("item", item), cancelled.is_set))
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
