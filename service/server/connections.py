"""Slow and excess clients: limits uvicorn does not set by itself (`nlg serve` passes them).

- `HEADER_TIMEOUT_S`: a connection that has not sent a whole request head this long after it opened is
  closed (slowloris: uvicorn has no header timeout). Between requests, uvicorn's keep-alive timeout applies.
- `BODY_TIMEOUT_S`: a request body that sends nothing for this long gets 408 and its connection is closed
  (`service.server.http_errors.BodyLimit` enforces it as the body is read).
- `MAX_CONNECTIONS`: past this many open connections a request gets uvicorn's 503 (`limit_concurrency`),
  and past twice as many a new connection is closed at once, so file descriptors stay bounded.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 15.0
BODY_TIMEOUT_S = 15.0
MAX_CONNECTIONS = 512


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the first request head and a hard cap on connections."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > 2 * MAX_CONNECTIONS:
            transport.close()
            return
        self.loop.call_later(HEADER_TIMEOUT_S, self._head_due)

    def _head_due(self) -> None:
        if self.scope is None and not self.transport.is_closing():  # no request head yet
            self.transport.close()


def guarded() -> dict:
    """The uvicorn.Config options that set these limits (`nlg serve` and the tests' live servers)."""
    return {"http": GuardedH11, "limit_concurrency": MAX_CONNECTIONS}
