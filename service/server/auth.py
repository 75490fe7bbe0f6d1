"""`--api-key` (one or several): every /v1 route, `/tokenize` and `/detokenize` need `Authorization:
Bearer <key>` with one of the keys (probes and docs stay open).

A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) wraps `receive`
so that the route never sees the client's `http.disconnect`, and a plain request whose client hung up
ran to its last token.
"""

from __future__ import annotations

import hmac

from service.server.http_errors import error

GUARDED = ("/v1/", "/tokenize", "/detokenize")


class ApiKey:
    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(GUARDED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            matched = [hmac.compare_digest(token, k) for k in self.keys]  # every key compared: no early exit
            if scheme.lower() != b"bearer" or not any(matched):
                refusal = error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)
