"""Serving while the model loads: `nlg serve` listens at once, answers `/health` (200, "loading")
and everything else with 503 until the model is in memory, then hands every request to the real app
(and runs that app's own start-up and shut-down)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable

from fastapi import FastAPI


class Loading:
    def __init__(self, load: Callable[[], FastAPI], on_fatal: Callable[[], None] = lambda: None):
        self.load, self.on_fatal = load, on_fatal
        self.app: FastAPI | None = None
        self.failure: str | None = None
        self._lifespan = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._run_lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            status, body = 200, {"status": "loading" if not self.failure else "failed"}
        else:
            message = self.failure or "the model is still loading; retry shortly"
            body = {"error": {"message": message, "type": "unavailable", "param": None, "code": "loading"}}
            status = 503
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if status == 503:
            headers.append((b"retry-after", b"5"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _run_lifespan(self, receive, send) -> None:
        await receive()  # startup
        task = asyncio.create_task(self._start())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown
        task.cancel()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self) -> None:
        try:
            app = await asyncio.to_thread(self.load)
            self._lifespan = app.router.lifespan_context(app)
            await self._lifespan.__aenter__()
            self.app = app
        except Exception as e:
            self.failure = f"the model failed to load: {type(e).__name__}: {e}"
            print(f"nlg: error: {self.failure}", file=sys.stderr, flush=True)
            self.on_fatal()
