"""`/v1/summarize` and `/v1/answer` with uploaded documents: a multipart body (`files`, then the JSON
body's other fields as form fields) reaches these handlers instead of the JSON ones (`Multipart` routes
match only that content type; the JSON routes declare both bodies in the spec). Each file is read into
parts (`service.documents`: e-mail, Word, PowerPoint, Excel, PDF, HTML, text) in a child process bounded
in memory and by the request's deadline (`service.convert`); an unsupported type gets 415, an unreadable
file 422, a file over its cap or its memory 413 (and the whole body past `MAX_UPLOAD_BYTES`, while it is
read), a file still being read at the deadline 504. An answer is drawn from the passages ranked best for the
question (`service.retrieval`) and names the file, the part (slide, sheet, page, section, message) and
the characters it drew on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.routing import APIRoute
from starlette.routing import Match

from service import convert, documents, retrieval
from service.server.routes.tasks import respond, usage
from service.server.schemas.tasks import (
    MAX_FILES,
    AnswerRequest,
    AnswerResponse,
    AnswerUpload,
    Citation,
    SummarizeRequest,
    SummarizeResponse,
    SummarizeUpload,
)
from service.tasks.answer import Answer, answer_plan, answer_source
from service.tasks.document_summary import document_plan
from service.tasks.summarize import Summary

MAX_UPLOAD_BYTES = MAX_FILES * documents.MAX_BYTES  # one multipart body (`service.server.app`'s BodyLimit)


UPLOAD_PATHS = ("/v1/summarize", "/v1/answer")  # this router's routes


def is_multipart(scope) -> bool:
    return dict(scope["headers"]).get(b"content-type", b"").lower().startswith(b"multipart/form-data")


def is_upload(scope) -> bool:
    """A multipart body to one of the routes that take uploads (elsewhere multipart gets no larger limit)."""
    return scope["path"].rstrip("/") in UPLOAD_PATHS and is_multipart(scope)


class Multipart(APIRoute):
    """A route that only a multipart body matches; any other falls through to the JSON route of the same path."""

    def matches(self, scope) -> tuple[Match, dict]:
        match, child = super().matches(scope)
        return (match, child) if match is Match.NONE or is_multipart(scope) else (Match.NONE, {})


router = APIRouter(prefix="/v1", route_class=Multipart, include_in_schema=False)


async def read_all(files: list[UploadFile], request: Request) -> list[documents.Document]:
    """Each file read in a child process bounded in memory and by the request's deadline
    (`service.convert`), killed at once when the client leaves."""
    loop, stop = asyncio.get_running_loop(), threading.Event()
    deadline = request.app.state.handle.deadline()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        stop.set()

    watcher = asyncio.create_task(watch())
    out = []
    try:
        for f in files:
            data = await f.read()
            left = convert.TIMEOUT_S if deadline is None else max(deadline - loop.time(), 0.0)
            out.append(await asyncio.to_thread(convert.convert, data, f.filename or "upload", left, stop))
    finally:
        watcher.cancel()
    return out


@router.post("/summarize")
async def summarize_files(form: Annotated[SummarizeUpload, Form()], request: Request):
    gen = request.app.state.gen
    docs = await read_all(form.files, request)
    text = "\n\n".join(d.text() for d in docs)
    plan = document_plan(gen, docs, form.length, form.max_words, form.temperature, form.seed)
    req = SummarizeRequest.model_construct(stream=form.stream, evaluate=None)

    def shape(s: Summary, scored) -> SummarizeResponse:
        return SummarizeResponse(
            summary=s.summary,
            citations=s.citations,
            scores=scored,
            model=gen.name,
            usage=usage(s.prompt_tokens, s.completion_tokens, s.windows, s.rounds),
        )

    return await respond(req, plan, request, "summarize", text, shape)


@router.post("/answer")
async def answer_files(form: Annotated[AnswerUpload, Form()], request: Request):
    gen = request.app.state.gen
    docs = await read_all(form.files, request)
    found = await asyncio.to_thread(lambda: retrieval.rank(form.question, retrieval.passages(docs)))
    passages = [p.text for p in found]
    plan = answer_plan(gen, form.question, passages, form.max_tokens, form.temperature, form.seed)
    req = AnswerRequest.model_construct(stream=form.stream, evaluate=None)

    def shape(a: Answer, scored) -> AnswerResponse:
        p = None if a.passage_index is None else found[a.passage_index]
        return AnswerResponse(
            answer=a.answer,
            scores=scored,
            passage_index=a.passage_index,
            answered=a.answered,
            citation=Citation(file=p.file, part=p.part, start=p.start, end=p.end, passage=p.text) if p else None,
            model=gen.name,
            usage=usage(a.prompt_tokens, a.completion_tokens, a.windows),
        )

    return await respond(req, plan, request, "answer", answer_source(form.question, passages), shape)
