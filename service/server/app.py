"""The HTTP service: FastAPI over one loaded model.

The lifespan starts the engine thread (`service.engine.scheduler.Scheduler`, continuous batching) and the async
handle every handler talks to it through (`service.engine.handle`): no thread waits per request, every queued
request counts toward `--max-waiting`, and everything that can refuse a request (bad input, overload,
a request that can never fit) does so before the response starts, streams included. Errors have one
shape and the statuses of `service.server.http_errors`. Bodies are limited while they are read (chunked
uploads too). `/ready` runs a real forward on every rank, at most once per `READY_TTL_S`.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.engine.generator import TextGenerator
from service.engine.handle import AsyncEngine, TaskRun
from service.engine.metrics import Metrics
from service.engine.scheduler import Scheduler
from service.evals import scoring
from service.jobs.store import MAX_JOB_BYTES, JobRunner, JobStore, build_jobs_router
from service.server import http_errors
from service.server.http_errors import error
from service.server.routes.openai import build_router
from service.server.schemas.tasks import (
    AnswerRequest,
    AnswerResponse,
    ErrorResponse,
    SummarizeRequest,
    SummarizeResponse,
    Usage,
)
from service.server.streams import sse
from service.tasks.answer import Answer, answer_plan, answer_source
from service.tasks.summarize import Summary, summarize_plan

MAX_BODY_BYTES = 2 * 1024 * 1024
READY_TTL_S = 1.0  # /ready probes the engine at most this often; callers in between get the last answer
PROBE_TIMEOUT_S = 10.0  # a probe the engine has not answered by then makes /ready 503
ERROR = {"model": ErrorResponse}
ERRORS = {s: ERROR for s in (400, 401, 404, 413, 422, 429, 500, 503, 504)}
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream: server-sent events"}}

# --score-traffic: cheap reference-free hooks per task, and the scores of theirs that are exported
QUALITY = {
    "answer": (["sentence", "support"], ["full_sentence", "support"]),
    "summarize": (["support", "novelty"], ["support", "novel_trigrams", "copied_sentences"]),
}


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


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


def build_app(
    gen: TextGenerator,
    on_fatal=lambda: None,
    api_key: str | None = None,
    slots: int = 16,
    max_waiting: int = 64,
    jobs_db: str = ":memory:",
    request_timeout: float | None = 600.0,
    score_traffic: bool = False,
) -> FastAPI:
    """The lifespan starts the engine thread (`slots` sequences at once, `max_waiting` queued before
    429), warms up the decode step (CUDA graphs captured, and compiled with `--compile`) before the app
    takes requests, and stops the thread. `on_fatal` runs after an engine failure (a dead rank, a
    collective timeout) has failed every request in flight; `nlg serve` makes it shut the server down and
    exit non-zero so a supervisor restarts the service. With `api_key`, every /v1 route wants
    `Authorization: Bearer <key>` (health, readiness, metrics and the docs stay open). Batch jobs live in
    the SQLite file `jobs_db`. A request running longer than `request_timeout` seconds is stopped and
    gets 504 (a stream: a last error event). With `score_traffic`, every answer and summary is scored by
    the cheap reference-free hooks (`QUALITY`) into the Prometheus histogram
    `nlg_quality_score{task, metric}`."""
    metrics = gen.metrics = Metrics()

    def scores(task: str, ev, prediction: str, source: str) -> dict | None:
        """The scores asked for, on a worker thread (a hook that needs the model waits for the engine
        thread there, not on the event loop); traffic scoring feeds the histograms."""
        if score_traffic:
            hooks, exported = QUALITY[task]
            values = scoring.evaluate(hooks, prediction, [], source)
            for name in exported:
                metrics.quality.labels(task, name).observe(values[name])
        return scoring.evaluate(ev.metrics, prediction, ev.references, source, gen) if ev else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler = Scheduler(gen.engine, slots, max_waiting=max_waiting, metrics=metrics, on_fatal=on_fatal)
        app.state.scheduler = scheduler.start()
        handle = app.state.handle = AsyncEngine(gen, scheduler, request_timeout)
        started = time.perf_counter()
        warmed = await handle.call(lambda: gen.engine.warm_up(scheduler.batcher.cache))
        if warmed:
            took = time.perf_counter() - started
            print(f"nlg: decode step warmed up for {len(warmed)} (rows, span) buckets in {took:.1f} s", file=sys.stderr)
        runner.start()
        yield
        runner.stop()
        scheduler.stop()

    bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")
    app = FastAPI(
        title="nlg",
        version="0.1.0",
        description="Full-sentence answers and abstractive summaries from a tensor-parallel decoder.",
        responses=ERRORS,
        lifespan=lifespan,
    )
    app.include_router(build_router(gen), dependencies=[Depends(bearer)])
    store = JobStore(jobs_db)
    runner = JobRunner(gen, store)
    app.include_router(build_jobs_router(store, runner), dependencies=[Depends(bearer)])
    readiness = Readiness(gen, runner)
    http_errors.install(app)
    app.add_middleware(
        http_errors.BodyLimit, limit=lambda path: MAX_JOB_BYTES if path.startswith("/v1/batches") else MAX_BODY_BYTES
    )

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        """The process is up (it may still be unable to generate: see /ready)."""
        return {"status": "ok", "model": gen.name}

    @app.get("/ready")
    async def ready(request: Request):
        """A real one-token forward on every rank (at most one per second); 503 once the engine has
        failed, or when it does not answer in time."""
        problem = await readiness.check(request.app.state.handle)
        if problem is not None:
            return error(503, problem, code="not_ready", headers={"Retry-After": "5"})
        return {"status": "ready", "model": gen.name}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def respond(req, plan, request: Request, task: str, source: str, shape):
        """Run a task's plan; as JSON, or with `req.stream` as server-sent events: {"delta"} pieces of the
        raw text, then the full response object, then [DONE]. Everything that can refuse the request
        (metrics asked for, the input, the queue) does so before the response starts."""
        if req.evaluate:
            scoring.check(req.evaluate.metrics, req.evaluate.references)
        run = TaskRun(request.app.state.handle, plan)
        await run.begin()

        async def finish(value):
            return shape(value, await asyncio.to_thread(scores, task, req.evaluate, value_text(value), source))

        if not req.stream:
            return await finish(await run.wait(request.is_disconnected))

        async def events():
            async for piece in run.pieces():
                yield {"delta": piece}
            yield (await finish(run.value)).model_dump()

        return sse(events(), on_close=run.abort)

    def value_text(value) -> str:
        return value.answer if isinstance(value, Answer) else value.summary

    @app.post("/v1/answer", response_model=AnswerResponse, responses=STREAMED, dependencies=[Depends(bearer)])
    async def answer(req: AnswerRequest, request: Request):
        plan = answer_plan(gen, req.question, req.passages, req.max_tokens, req.temperature, req.seed)

        def shape(a: Answer, scored) -> AnswerResponse:
            return AnswerResponse(
                answer=a.answer,
                scores=scored,
                passage_index=a.passage_index,
                model=gen.name,
                usage=usage(a.prompt_tokens, a.completion_tokens),
            )

        return await respond(req, plan, request, "answer", answer_source(req.question, req.passages), shape)

    @app.post("/v1/summarize", response_model=SummarizeResponse, responses=STREAMED, dependencies=[Depends(bearer)])
    async def summarize(req: SummarizeRequest, request: Request):
        plan = summarize_plan(gen, req.text(), req.length, req.max_words, req.temperature, req.seed)

        def shape(s: Summary, scored) -> SummarizeResponse:
            return SummarizeResponse(
                summary=s.summary, scores=scored, model=gen.name, usage=usage(s.prompt_tokens, s.completion_tokens)
            )

        return await respond(req, plan, request, "summarize", req.text(), shape)

    return app
