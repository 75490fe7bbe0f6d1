"""Server-sent events through sse-starlette: `sse(events, on_close)` sends each dict as `data: {json}`, then
`data: [DONE]`, with the headers that keep proxies from buffering a stream (`Cache-Control: no-cache`,
`X-Accel-Buffering: no`) and a `: ping` comment every `PING_S` seconds of silence, so that idle
connections are not cut while a long prompt is prefilled. sse-starlette also watches for the client
hanging up and then cancels the stream, which aborts its sequences. When the server stops (SIGTERM), a
stream is not cut: it has `DRAIN_S` seconds to finish, the time `nlg serve` gives requests in flight.

The response's status and headers go out before the first event, so every error known before the
first token must be raised before `sse` is called (the handlers submit to the engine first). An error
raised while streaming becomes a last `data: {"error": ...}` event in the API's error shape. `on_close`
runs however the response ends (finished, failed, or the client gone before the first event), so a
request's sequences are always aborted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse

from service.server.http_errors import error_body

PING_S = 15
DRAIN_S = 20  # seconds requests in flight get when the server stops: sse-starlette's grace for streams and
# uvicorn's for the rest (`nlg serve`), under the tensor-parallel launcher's 30 s kill timeout


class EventStream(EventSourceResponse):
    def __init__(self, body, on_close: Callable[[], None] | None = None):
        super().__init__(
            body, headers={"Cache-Control": "no-cache"}, ping=PING_S, sep="\n", shutdown_grace_period=DRAIN_S
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()


def sse(events: AsyncIterator[dict], on_close: Callable[[], None] | None = None, named: bool = False) -> EventStream:
    """`named`: each event's `type` is also its SSE event name (OpenAI's Responses API)."""

    async def body():
        try:
            async for event in events:
                data = {"data": json.dumps(event, ensure_ascii=False)}
                yield ({"event": event["type"]} | data) if named else data
        except Exception as e:  # the status went out with the headers: report in the stream, OpenAI style
            _, payload = error_body(e)
            yield {"data": json.dumps(payload)}
        yield {"data": "[DONE]"}

    return EventStream(body(), on_close)
