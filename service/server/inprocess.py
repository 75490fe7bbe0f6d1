"""Requests to the app's own routes from inside the process (the jobs runner's OpenAI batch lines): the same
middleware, validation and handlers as a client's request, over httpx's ASGI transport, no socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
