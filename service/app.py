"""The HTTP service: FastAPI over one loaded model.

This first service runs one generation at a time (a lock around the engine); the production
engine with continuous batching is its own piece of work. Every error has one shape,
`{"error": {"message", "type", "param", "code"}}`, with the status that fits: 400 for input the
model cannot take (too long for the context), 413 for an oversized body, 422 for a malformed
request.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from service import scoring, tasks
from service.generate import TextGenerator
from service.jobs import MAX_JOB_BYTES, JobRunner, JobStore, build_jobs_router
from service.metrics import Metrics
from service.openai_api import build_router, sse
from service.scheduler import EngineFailed, Overloaded, Scheduler
from service.schemas import AnswerRequest, AnswerResponse, ErrorResponse, SummarizeRequest, SummarizeResponse, Usage
from service.sequence import ContextOverflow
from service.streams import ClientGone, DeadlineExceeded, Done, complete, stream

MAX_BODY_BYTES = 2 * 1024 * 1024
ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "unavailable",
    504: "timeout",
}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERRORS.get(status, "server_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --score-traffic: cheap reference-free hooks per task, and the scores of theirs that are exported
QUALITY = {
    "answer": (["sentence", "support"], ["full_sentence", "support"]),
    "summarize": (["support", "novelty"], ["support", "novel_trigrams", "copied_sentences"]),
}


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


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
    """The lifespan starts the engine thread (`Scheduler`, `slots` sequences at once, `max_waiting`
    queued before 429), warms up the decode step (CUDA graphs captured, and compiled with `--compile`)
    before the app takes requests, and stops the thread. `on_fatal` runs after an engine failure (a
    dead rank, a collective timeout) has been reported with 503; `nlg serve` makes it exit non-zero so a
    supervisor restarts the service. With `api_key`, every /v1 route wants `Authorization: Bearer <key>` (health,
    readiness, metrics and the docs stay open). Batch jobs live in the SQLite file `jobs_db`. A request
    running longer than `request_timeout` seconds is stopped and gets 504. With `score_traffic`, every
    answer and summary is scored by the cheap reference-free hooks (`QUALITY`) into the Prometheus
    histogram `nlg_quality_score{task, metric}`."""
    metrics = gen.metrics = Metrics()

    def scores(task: str, ev, prediction: str, source: str) -> dict | None:
        """The scores asked for, on the calling worker thread (a hook that needs the model waits for the
        engine thread there, not on the event loop); traffic scoring feeds the histograms."""
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
        started = time.perf_counter()
        warmed = await asyncio.to_thread(scheduler.call, lambda: gen.engine.warm_up(scheduler.batcher.cache))
        if warmed:
            took = time.perf_counter() - started
            print(f"nlg: decode step warmed up for {len(warmed)} (rows, span) buckets in {took:.1f} s", file=sys.stderr)
        runner.start()
        yield
        runner.stop()
        scheduler.stop()

    app = FastAPI(
        title="nlg",
        version="0.1.0",
        description="Full-sentence answers and abstractive summaries from a tensor-parallel decoder.",
        responses={
            400: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
            429: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
        lifespan=lifespan,
    )
    app.include_router(build_router(gen, request_timeout))
    store = JobStore(jobs_db)
    runner = JobRunner(gen, store)
    app.include_router(build_jobs_router(store, runner))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
                response = error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await call_next(request)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        limit = MAX_JOB_BYTES if request.url.path.startswith("/v1/batches") else MAX_BODY_BYTES
        if size is not None and size.isdigit() and int(size) > limit:
            return error(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error(
            422, f"{where}: {first['msg']}" if where else first["msg"], param=where or None, code=first.get("type")
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ContextOverflow)
    async def overflow(request: Request, exc: ContextOverflow):
        return error(400, str(exc), code="context_length_exceeded")

    @app.exception_handler(EngineFailed)
    async def failed(request: Request, exc: EngineFailed):
        return error(503, str(exc), code="engine_failed")

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(DeadlineExceeded)
    async def too_slow(request: Request, exc: DeadlineExceeded):
        return error(504, str(exc), code="timeout")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        response = error(429, str(exc), code="overloaded")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError):
        return error(400, str(exc))

    @app.get("/health")
    def health() -> dict:
        """The process is up (it may still be unable to generate: see /ready)."""
        return {"status": "ok", "model": gen.name}

    @app.get("/ready")
    def ready() -> dict:
        """A real one-token forward on every rank; 503 once the engine has failed."""
        gen.engine.probe()
        return {"status": "ready", "model": gen.name}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def respond(req, work, request: Request, shape):
        """Run a task; as JSON, or with `req.stream` as server-sent events: {"delta"} pieces of the raw
        text, then the full response object, then [DONE]. Metrics asked for are checked first."""
        if req.evaluate:
            scoring.check(req.evaluate.metrics, req.evaluate.references)
        if not req.stream:
            return shape(await complete(work, request, request_timeout))

        async def events():
            async for item in stream(work):
                yield shape(item.result).model_dump() if isinstance(item, Done) else {"delta": item}

        return sse(events())

    @app.post("/v1/answer", response_model=AnswerResponse)
    async def answer(req: AnswerRequest, request: Request):
        def work(push, cancelled):
            a = tasks.answer(
                gen,
                req.question,
                req.passages,
                req.max_tokens,
                req.temperature,
                req.seed,
                cancelled=cancelled,
                on_text=push,
            )
            return a, scores("answer", req.evaluate, a.answer, tasks.answer_source(req.question, req.passages))

        def shape(done) -> AnswerResponse:
            a, scored = done
            return AnswerResponse(
                answer=a.answer,
                scores=scored,
                passage_index=a.passage_index,
                model=gen.name,
                usage=usage(a.prompt_tokens, a.completion_tokens),
            )

        return await respond(req, work, request, shape)

    @app.post("/v1/summarize", response_model=SummarizeResponse)
    async def summarize(req: SummarizeRequest, request: Request):
        def work(push, cancelled):
            s = tasks.summarize(
                gen,
                req.text(),
                req.length,
                req.max_words,
                req.temperature,
                req.seed,
                cancelled=cancelled,
                on_text=push,
            )
            return s, scores("summarize", req.evaluate, s.summary, req.text())

        def shape(done) -> SummarizeResponse:
            s, scored = done
            return SummarizeResponse(
                summary=s.summary,
                scores=scored,
                model=gen.name,
                usage=usage(s.prompt_tokens, s.completion_tokens),
            )

        return await respond(req, work, request, shape)

    return app
