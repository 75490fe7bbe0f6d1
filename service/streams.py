"""Running a blocking generation for an HTTP handler, so that it stops when nobody waits for it.

`work(push, cancelled)` runs on a thread. `stream(work)` yields what it pushes, then `Done(result)`;
`complete(work, request, timeout)` just waits for the result. When the client disconnects, or the
request outlives its deadline, `cancelled()` turns true and the engine drops the sequence at its next
step, freeing its slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any


class DeadlineExceeded(RuntimeError):
    pass


class ClientGone(RuntimeError):
    pass


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


async def complete(
    work: Callable[[Callable[[Any], None], Callable[[], bool]], Any], request: Any, timeout: float | None = None
) -> Any:
    """Wait for `work(None, cancelled)`, checking for a client disconnect and the deadline."""
    cancelled = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, lambda: work(None, cancelled.is_set))
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                raise ClientGone("the client went away")
            if deadline is not None and asyncio.get_running_loop().time() > deadline:
                raise DeadlineExceeded(f"the request took longer than its {timeout:g} s deadline")
    finally:
        cancelled.set()
