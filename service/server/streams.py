"""Server-sent events: `sse(events, on_close)` sends each dict as `data: {json}`, then `data: [DONE]`.

The response's status and headers go out before the first event, so every error known before the
first token must be raised before `sse` is called (the handlers submit to the engine first). An error
raised while streaming becomes a last `data: {"error": ...}` event in the API's error shape. `on_close`
runs however the response ends (finished, failed, or the client gone before the first event), so a
request's sequences are always aborted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse

from service.server.http_errors import error_body


class EventStream(StreamingResponse):
    def __init__(self, body, on_close: Callable[[], None] | None = None):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()


def sse(events: AsyncIterator[dict], on_close: Callable[[], None] | None = None) -> EventStream:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:  # the status went out with the headers: report in the stream, OpenAI style
            _, payload = error_body(e)
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    return EventStream(body(), on_close)
