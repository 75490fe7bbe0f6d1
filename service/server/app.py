"""The HTTP service: FastAPI over one loaded model.

`build_app` wires the pieces; the handlers live in `service.server.routes` (one module per API
family) and reach the shared state through `app.state`: `gen` (the text generator), `handle` (the
async engine handle), `engine`, `jobs` and `runner` (batch jobs), `metrics`, `readiness`,
`score_traffic`. The lifespan starts the engine thread (`service.engine.core.Engine.start`,
continuous batching) and the handle every handler talks to it through: no thread waits per request,
every queued request counts toward `--max-waiting`, and everything that can refuse a request does so
before the response starts, streams included. Errors have one shape and the statuses of
`service.server.http_errors`; bodies are limited while they are read (chunked uploads too).
"""

from __future__ import annotations

import sys
import time
from contextlib import asynccontextmanager
from functools import partial

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline

from service.engine.generator import TextGenerator
from service.engine.handle import AsyncEngine
from service.engine.metrics import Metrics
from service.jobs.store import JobStore
from service.jobs.worker import JobRunner
from service.server import http_errors
from service.server.auth import ApiKey
from service.server.inprocess import poster
from service.server.observe import Observed
from service.server.routes import batches, embeddings, files, health, jobs, openai, responses, tasks, tokens, uploads

MAX_BODY_BYTES = 2 * 1024 * 1024
TAGS = [
    {"name": "Answers and summaries", "description": "The service's own tasks: full-sentence answers, summaries"},
    {"name": "OpenAI-compatible", "description": "OpenAI's API: any OpenAI client works with base_url .../v1"},
    {"name": "Files", "description": "OpenAI's Files API: the input and output files of batches"},
    {"name": "Batches", "description": "OpenAI's Batch API: a file of requests to one endpoint, run in the background"},
    {"name": "Task jobs", "description": "Answers or summaries over JSONL, one record per line, resumable"},
    {"name": "Health", "description": "Liveness and readiness (a real forward on every rank)"},
]


def build_app(
    gen: TextGenerator,
    on_fatal=lambda: None,
    api_keys: list[str] | tuple[str, ...] = (),
    slots: int = 16,
    max_waiting: int = 64,
    jobs_db: str = ":memory:",
    request_timeout: float | None = 600.0,
    score_traffic: bool = False,
    allowed_origins: list[str] | tuple[str, ...] = (),
) -> FastAPI:
    """The lifespan starts the engine thread (`slots` sequences at once, `max_waiting` queued before
    429), warms up the decode step (CUDA graphs captured, and compiled with `--compile`) before the app
    takes requests, and stops the thread. `on_fatal` runs after an engine failure (a dead rank, a
    collective timeout) has failed every request in flight; `nlg serve` makes it shut the server down and
    exit non-zero so a supervisor restarts the service. With `api_keys`, every /v1 route (and /tokenize,
    /detokenize) wants `Authorization: Bearer <key>` with one of them (health, readiness, metrics and the
    docs stay open). Browsers on `allowed_origins` may call it (CORS; none by default). Batch jobs (the
    tasks' jobs, OpenAI batches and their files) live in the SQLite file `jobs_db`. A request running
    longer than `request_timeout` seconds is stopped and gets 504 (a stream: a last error event). With
    `score_traffic`, every answer and summary is scored by the cheap reference-free hooks
    (`routes.tasks.QUALITY`) into the Prometheus histogram `nlg_quality_score{task, metric}`."""
    metrics = gen.metrics = Metrics(gen.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = app.state.engine = gen.engine.start(slots, max_waiting, metrics, on_fatal)
        pool = engine.scheduler.pool
        tokens, size = pool.capacity * pool.size, pool.capacity * pool.size * engine.runner.token_bytes()
        print(
            f"nlg: KV cache: {pool.capacity} blocks of {pool.size} tokens, {tokens} tokens ({size / 2**30:.2f} GiB)",
            file=sys.stderr,
        )
        handle = app.state.handle = AsyncEngine(gen, request_timeout)
        started = time.perf_counter()
        warmed = await handle.call(engine.warm_up)
        if warmed:
            took = time.perf_counter() - started
            print(f"nlg: decode step warmed up for {len(warmed)} (rows, span) buckets in {took:.1f} s", file=sys.stderr)
        runner.start()
        yield
        runner.stop()
        engine.stop()

    app = FastAPIOffline(  # FastAPI with the /docs and /redoc assets served from the installed package
        title="nlg",
        version="0.1.0",
        description="Full-sentence answers and abstractive summaries from a tensor-parallel decoder. Errors have "
        'one shape, `{"error": {"message", "type", "param", "code"}}`; with `--api-key`, send '
        "`Authorization: Bearer KEY` (Authorize, above).",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    store = JobStore(jobs_db)
    runner = JobRunner(gen, store)
    app.state.gen, app.state.metrics, app.state.score_traffic = gen, metrics, score_traffic
    app.state.jobs, app.state.runner = store, runner
    app.state.readiness = health.Readiness(gen, runner)
    bearer = Depends(HTTPBearer(auto_error=False, description="the server's --api-key, when it has one"))
    app.include_router(health.router)
    for family in (uploads, tasks, openai, responses, embeddings, tokens, files, batches, jobs):  # uploads first
        app.include_router(family.router, dependencies=[bearer])
    http_errors.install(app)
    app.add_middleware(
        http_errors.BodyLimit,
        limit=lambda scope: (
            jobs.MAX_JOB_BYTES
            if scope["path"].startswith(("/v1/jobs", "/v1/files"))
            else uploads.MAX_UPLOAD_BYTES
            if uploads.is_upload(scope)
            else MAX_BODY_BYTES
        ),
    )

    if api_keys:
        app.add_middleware(ApiKey, keys=list(api_keys))
    if allowed_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(Observed, metrics=metrics)  # outermost: it sees the statuses of the others too
    runner.post = poster(app, api_keys[0] if api_keys else None)  # OpenAI batch lines go through the app too
    app.openapi = partial(openapi, app, app.openapi)
    return app


def openapi(app: FastAPI, generate) -> dict:
    """FastAPI's spec without the 422 it declares for every body (validation errors are 400 here); a route's
    own 422 (an unreadable upload) stays."""
    if app.openapi_schema is None:
        spec = generate()
        for path in spec["paths"].values():
            for op in path.values():
                responses = op.get("responses", {})
                if responses.get("422", {}).get("description") == "Validation Error":
                    del responses["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema
