"""One error shape, `{"error": {"message", "type", "param", "code"}}`, and the status of every error
class (`service.errors`): the exception handlers of the app and the error events of streams both come
from `error_body`. A body that cannot be encoded (a lone surrogate in a message) is escaped, never a
plain-text 500. `BodyLimit` refuses an oversized body with 413 while it is read, chunked or not, and a
stalled one with 408.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.errors import (
    ClientGone,
    DeadlineExceeded,
    EngineFailed,
    FileTooLarge,
    InvalidRequest,
    Overloaded,
    RequestFailed,
    Unreadable,
    UnsupportedMedia,
)
from service.server.connections import BODY_TIMEOUT_S
from service.server.invalid import describe
from service.server.schemas.base import ErrorResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable",
    504: "timeout",
}
WHEN = {
    400: "The input cannot work as sent (OpenAI's wording, param and code)",
    401: "A missing or wrong API key (with --api-key)",
    404: "A model this server does not serve, or an unknown batch job",
    413: "The body, or a file in it, is over the size limit",
    415: "A file of a type the service does not read (the message lists those it does)",
    422: "A file that cannot be read: corrupt, encrypted, or without text",
    429: "The queue is full: retry after Retry-After seconds",
    500: "This request failed on the engine thread; the service goes on",
    503: "The engine failed (the service exits to be restarted), or it is not ready",
    504: "The request ran past --request-timeout",
}
METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")  # those a 405's Allow may name
# error classes, most specific first: (class, status, code)
STATUS = (
    (UnsupportedMedia, 415, None),
    (Unreadable, 422, None),
    (FileTooLarge, 413, None),
    (InvalidRequest, 400, None),
    (Overloaded, 429, "overloaded"),
    (RequestFailed, 500, "request_failed"),
    (EngineFailed, 503, "engine_failed"),
    (DeadlineExceeded, 504, "timeout"),
)


class SafeJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting a lone surrogate still encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def responses(*statuses: int) -> dict:
    """The OpenAPI responses of a route that can fail with these statuses (all in the one error shape)."""
    return {s: {"model": ErrorResponse, "description": WHEN[s]} for s in statuses}


def found(lookup, key: str, what: str):
    """`lookup(key)`; its KeyError (an unknown id in the jobs' store) is 404 "No such {what}: {key}"."""
    try:
        return lookup(key)
    except KeyError:
        raise HTTPException(404, f"No such {what}: {key}") from None


def allowed(request: Request) -> str:
    """Every method some route of this path takes (Starlette's 405 names only the first route's)."""
    routes = request.app.router.routes
    return ", ".join(
        m for m in METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
    )


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None) -> SafeJSON:
    return SafeJSON(body(status, message, param, code), status_code=status, headers=headers)


def error_body(exc: BaseException) -> tuple[int, dict]:
    """The status and body for an exception raised while serving a request."""
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, body(status, str(exc), getattr(exc, "param", None), getattr(exc, "code", None) or code)
    return 500, body(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def install(app: FastAPI) -> None:
    """The app's exception handlers: every error in the one shape, with its status and headers."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, *describe(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        headers = {"Allow": allowed(request)} if exc.status_code == 405 else exc.headers
        return error(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    async def known(request: Request, exc: Exception):
        status, payload = error_body(exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return SafeJSON(payload, status_code=status, headers=headers)

    for cls, _, _ in STATUS:
        app.add_exception_handler(cls, known)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        print(f"nlg: error: {request.method} {request.url.path} failed:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        status, payload = error_body(exc)
        return SafeJSON(payload, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit(scope)` bytes, from its Content-Length at once, or as
    the bytes of a chunked upload pass the limit; 408 for a body that sends nothing for `BODY_TIMEOUT_S`
    (both raised from `receive`, so the route's read of the body fails into the exception handlers)."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = f"the request body exceeds the limit of {limit} bytes"
        if declared.isdigit() and int(declared) > limit:
            return await error(413, f"{too_large} (Content-Length {int(declared)})")(scope, receive, send)
        seen, done = 0, False

        async def limited():
            nonlocal seen, done
            if done:  # the body is in: what follows (a disconnect) may take as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body sent nothing for {BODY_TIMEOUT_S:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large)
                done = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)
