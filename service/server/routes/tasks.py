"""`/v1/answer` and `/v1/summarize`: the tasks' plans driven on the event loop (`TaskRun`), as JSON or
server-sent events. Their multipart form (uploaded documents) is handled in `routes.uploads` and declared
here, beside the JSON body. Everything that can refuse a request (the metrics asked for, the input, the queue)
does so before the response starts; scores are computed on a worker thread."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from service.engine.handle import Progress, TaskRun
from service.evals import scoring
from service.server.http_errors import responses
from service.server.schemas.tasks import (
    AnswerRequest,
    AnswerResponse,
    AnswerUpload,
    SummarizeRequest,
    SummarizeResponse,
    SummarizeUpload,
    Usage,
    multipart,
)
from service.server.streams import sse
from service.tasks.answer import Answer, answer_plan, answer_source
from service.tasks.sources import sentence_sources, supporting_span
from service.tasks.summarize import Summary, summarize_plan

STREAMED = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream: server-sent events"}
} | responses(400, 401, 413, 415, 422, 429, 500, 503, 504)
# --score-traffic: cheap reference-free hooks per task, and the scores of theirs that are exported
QUALITY = {
    "answer": (["sentence", "support"], ["full_sentence", "support"]),
    "summarize": (["support", "novelty"], ["support", "novel_trigrams", "copied_sentences"]),
}

router = APIRouter(prefix="/v1", tags=["Answers and summaries"])


def usage(prompt: int, completion: int, windows: int | None = None, rounds: int | None = None) -> Usage:
    total = prompt + completion
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, windows=windows, rounds=rounds)


def scores(state, task: str, ev, prediction: str, source: str, wait: float | None) -> dict | None:
    """The scores asked for, on the calling worker thread (a hook that needs the model waits for the
    engine thread there, not on the event loop), waiting at most `wait` s for scoring's turn (504 past
    it); with --score-traffic, the histograms too."""
    if state.score_traffic:
        hooks, exported = QUALITY[task]
        values = scoring.evaluate(hooks, prediction, [], source, wait=wait)
        for name in exported:
            state.metrics.quality.labels(state.metrics.model_name, task, name).observe(values[name])
    return scoring.evaluate(ev.metrics, prediction, ev.references, source, state.gen, wait) if ev else None


async def respond(req, plan, request: Request, task: str, source: str, shape):
    """Run a task's plan; as JSON, or with `req.stream` as server-sent events: {"delta"} pieces of the
    raw text, then the full response object, then [DONE]."""
    state = request.app.state
    if req.evaluate:
        scoring.check(req.evaluate.metrics, req.evaluate.references)
    run = TaskRun(state.handle, plan, stream=req.stream)
    await run.begin()

    async def finish(value: Answer | Summary):
        text = value.answer if isinstance(value, Answer) else value.summary
        wait = None if run.deadline is None else run.deadline - asyncio.get_running_loop().time()
        scored = await asyncio.to_thread(scores, state, task, req.evaluate, text, source, wait)
        return await asyncio.to_thread(shape, value, scored)  # (finding sources splits the documents)

    if not req.stream:
        return await finish(await run.wait(request.is_disconnected))

    async def events():
        async for piece in run.pieces():
            yield {"progress": piece._asdict()} if isinstance(piece, Progress) else {"delta": piece}
        yield (await finish(run.value)).model_dump()

    return sse(events(), on_close=run.abort)


@router.post("/answer", response_model=AnswerResponse, responses=STREAMED, openapi_extra=multipart(AnswerUpload))
async def answer(req: AnswerRequest, request: Request):
    """A direct answer in one full sentence, from the model's knowledge or from the passages sent (then
    `passage_index` says which one supports it). Passages past the context are answered window by window.

    Or, as multipart, from uploaded documents (`files`: e-mail, Word, PowerPoint, Excel, PDF, HTML, text):
    they are cut into passages along their structure (slides, sheets, pages, sections, messages; long
    parts at paragraphs), the passages ranked for the question (BM25, fused with dense embeddings where
    installed), and the best answered from; `citation` names the file, part and characters the answer
    drew on."""
    gen = request.app.state.gen
    plan = answer_plan(gen, req.question, req.passages, req.max_tokens, req.temperature, req.seed)

    def shape(a: Answer, scored) -> AnswerResponse:
        span = None
        if req.format == "json" and a.passage_index is not None:
            passage = req.passages[a.passage_index]
            found = supporting_span(a.answer, req.question, passage)
            span = None if found is None else {"start": found[0], "end": found[1], "text": passage[slice(*found)]}
        return AnswerResponse(
            answer=a.answer,
            scores=scored,
            passage_index=a.passage_index,
            answered=a.answered,
            span=span,
            model=gen.name,
            usage=usage(a.prompt_tokens, a.completion_tokens, a.windows),
        )

    return await respond(req, plan, request, "answer", answer_source(req.question, req.passages), shape)


@router.post(
    "/summarize", response_model=SummarizeResponse, responses=STREAMED, openapi_extra=multipart(SummarizeUpload)
)
async def summarize(req: SummarizeRequest, request: Request):
    """An abstractive summary of one document or several; a document past the context is summarized in
    pieces, and the pieces' summaries are summarized again (map-reduce).

    Or, as multipart, of uploaded documents (`files`), read with their structure (a deck's slides, a
    workbook's sheets with their header rows, an e-mail thread's messages by sender and its attachments,
    a PDF's pages); past the context, groups of whole parts are summarized and then their summaries.
    `citations` gives each summary sentence's file and part, where one shares its words."""
    gen = request.app.state.gen
    plan = summarize_plan(gen, req.text(), req.length, req.max_words, req.temperature, req.seed)

    def shape(s: Summary, scored) -> SummarizeResponse:
        documents = [req.document] if req.document is not None else req.documents
        found = sentence_sources(s.summary, documents) if req.format == "json" else None
        return SummarizeResponse(
            summary=s.summary,
            sentences=found,
            scores=scored,
            model=gen.name,
            usage=usage(s.prompt_tokens, s.completion_tokens, s.windows, s.rounds),
        )

    return await respond(req, plan, request, "summarize", req.text(), shape)
