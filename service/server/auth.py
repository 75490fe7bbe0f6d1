"""`--api-key`: every /v1 route needs `Authorization: Bearer <key>` (probes and docs stay open).

A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) wraps `receive`
so that the route never sees the client's `http.disconnect`, and a plain request whose client hung up
ran to its last token.
"""

from __future__ import annotations

import hmac

from service.server.http_errors import error


class ApiKey:
    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.key):
                refusal = error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)
