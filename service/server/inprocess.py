"""Requests to the app's own routes from inside the process: the same middleware, validation and handlers as
a client's request, no socket.

- `poster`: the jobs runner's OpenAI batch lines, over httpx's ASGI transport (whole responses).
- `respond`: each request a replica under `nlg serve --ray` is handed by the ingress
  (`service.server.cluster`), its response yielded as the app sends it (httpx's transport would hold a
  stream until its end). The request is a plain dict (`request_of`: method, path, query string, headers
  as byte pairs, body, client) so that it crosses Ray as a value; `respond` yields the response's start
  (`{"status", "headers"}`), then each piece of its body (a stream's events one by one). When the
  consumer stops early (the client left, the ingress cancelled the call), the app sees its client
  disconnect, as it would from uvicorn, and aborts the request's sequences.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx


def poster(app, api_key: str | None) -> Callable[[str, dict], tuple[int, dict, dict]]:
    """`post(path, body) -> (status, headers, JSON body)`, from any thread but the event loop's."""
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(path: str, body: dict) -> tuple[int, dict, dict]:
        async with httpx.AsyncClient(transport=transport, base_url="http://nlg.internal") as client:
            r = await client.post(path, json=body, headers=headers, timeout=None)
            return r.status_code, dict(r.headers), r.json()

    return lambda path, body: asyncio.run(send(path, body))


def request_of(scope: dict, body: bytes) -> dict:
    """The dict form of an HTTP request (its ASGI scope and whole body)."""
    return {
        "method": scope["method"],
        "path": scope["path"],
        "query_string": scope.get("query_string", b""),
        "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
        "body": body,
        "client": tuple(scope["client"]) if scope.get("client") else None,
    }


async def respond(app, request: dict) -> AsyncIterator[dict | bytes]:
    """Run `request` through the ASGI `app`: its start, then its body's pieces (module doc: `respond`)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "query_string": request["query_string"],
        "root_path": "",
        "headers": request["headers"],
        "client": request["client"],
        "server": None,
        "state": {},
    }
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    read = False

    async def receive() -> dict:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        finally:
            sent.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body"):
                    break
        if task.done() and task.exception() is not None:
            raise task.exception()
    finally:
        gone.set()  # a stream still running sees its client leave and stops
