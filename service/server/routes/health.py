"""`/health` (the process is up), `/ready` (a real forward on every rank, at most once per
`READY_TTL_S` however often it is called) and `/metrics` (Prometheus)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.engine.generator import TextGenerator
from service.engine.handle import AsyncEngine
from service.jobs.runner import JobRunner
from service.server.http_errors import error, responses

READY_TTL_S = 1.0  # /ready probes the engine at most this often; callers in between get the last answer
PROBE_TIMEOUT_S = 10.0  # a probe the engine has not answered by then makes /ready 503

router = APIRouter(tags=["Health"])


class Readiness:
    """/ready's answer: a one-token forward on every rank, shared by the callers of one `READY_TTL_S`."""

    def __init__(self, gen: TextGenerator, runner: JobRunner):
        self.gen, self.runner = gen, runner
        self.lock = asyncio.Lock()
        self.checked = -1e9
        self.problem: str | None = None

    async def check(self, handle: AsyncEngine) -> str | None:
        """None when ready, else what is wrong."""
        if handle.scheduler.failure:
            return handle.scheduler.failure
        async with self.lock:
            if time.monotonic() - self.checked < READY_TTL_S:
                return self.problem
            self.problem = None
            try:
                await asyncio.wait_for(handle.call(self.gen.engine.tiny_forward), PROBE_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.problem = f"the engine did not answer a probe within {PROBE_TIMEOUT_S:g} s"
            except Exception as e:
                self.problem = str(e)
            if self.problem is None and not self.runner.thread.is_alive():
                self.problem = "the batch jobs thread has stopped"
            self.checked = time.monotonic()
            return self.problem


@router.get("/health")
def health(request: Request) -> dict:
    """The process is up (it may still be unable to generate: see /ready)."""
    return {"status": "ok", "model": request.app.state.gen.name}


@router.get("/ready", responses=responses(503))
async def ready(request: Request):
    """A real one-token forward on every rank (at most one per second); 503 once the engine has failed,
    or when it does not answer in time."""
    state = request.app.state
    problem = await state.readiness.check(state.handle)
    if problem is not None:
        return error(503, problem, code="not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "model": state.gen.name}


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
