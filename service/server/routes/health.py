"""`/health` (the process is up), `/ready` (a real forward on every rank, at most once per
`READY_TTL_S` however often it is called, answered within about `READY_WAIT_S`) and `/metrics`
(Prometheus)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.engine.generator import TextGenerator
from service.engine.handle import AsyncEngine
from service.jobs.worker import JobRunner
from service.server.http_errors import error, responses

READY_TTL_S = 1.0  # /ready probes the engine at most this often; callers in between get the last answer
READY_WAIT_S = 0.5  # /ready waits this long for a probe it started, then answers with what it knows
PROBE_TIMEOUT_S = 5.0  # a probe the engine has not answered by then makes /ready 503

router = APIRouter(tags=["Health"])


class Readiness:
    """/ready's answer: a one-token forward on every rank, at most one at a time and one per `READY_TTL_S`.
    /ready never waits for the engine longer than `READY_WAIT_S`: a probe still running then keeps running
    in the background and the last answer stands, until the probe is `PROBE_TIMEOUT_S` old (a stopped
    rank, a step that never ends), which is a 503 at once."""

    def __init__(self, gen: TextGenerator, runner: JobRunner):
        self.gen, self.runner = gen, runner
        self.checked = -1e9
        self.problem: str | None = None
        self.probe: asyncio.Task | None = None
        self.probe_started = 0.0

    async def check(self, handle: AsyncEngine) -> str | None:
        """None when ready, else what is wrong."""
        if handle.engine.failure:
            return handle.engine.failure
        now = time.monotonic()
        if self.probe is None and now - self.checked >= READY_TTL_S:
            self.probe = asyncio.create_task(self._probe(handle))
            self.probe_started = now
        if self.probe is not None:
            await asyncio.wait({self.probe}, timeout=READY_WAIT_S)
            if self.probe is not None and time.monotonic() - self.probe_started > PROBE_TIMEOUT_S:
                return f"the engine did not answer a probe within {PROBE_TIMEOUT_S:g} s"
        return self.problem

    async def _probe(self, handle: AsyncEngine) -> None:
        try:
            await handle.call(self.gen.engine.runner.tiny_forward)
            problem = None if self.runner.thread.is_alive() else "the batch jobs thread has stopped"
        except Exception as e:
            problem = str(e)
        self.problem, self.checked, self.probe = problem, time.monotonic(), None


@router.get("/health")
def health(request: Request) -> dict:
    """The process is up (it may still be unable to generate: see /ready)."""
    return {"status": "ok", "model": request.app.state.gen.name}


@router.get("/ready", responses=responses(503))
async def ready(request: Request):
    """A real one-token forward on every rank (at most one per second; the answer comes within a second);
    503 once the engine has failed, or while a probe has gone unanswered for 5 s."""
    state = request.app.state
    problem = await state.readiness.check(state.handle)
    if problem is not None:
        return error(503, problem, code="not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "model": state.gen.name}


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
