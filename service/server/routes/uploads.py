"""`/v1/summarize/files` and `/v1/answer/files`: the two tasks over uploaded documents (multipart: `files`,
then the JSON routes' other fields as form fields). Each file is read into parts (`service.documents`:
e-mail, Word, PowerPoint, Excel, PDF, HTML, text) on a worker thread; an unsupported type gets 415, an
unreadable file 422, a file over its cap 413 (and the whole body past `MAX_UPLOAD_BYTES`, while it is
read). An answer is drawn from the passages ranked best for the question (`service.retrieval`) and names
the file, the part (slide, sheet, page, section) and the characters it drew on.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile

from service import documents, retrieval
from service.errors import InvalidRequest
from service.server.http_errors import responses
from service.server.routes.tasks import respond, usage
from service.server.schemas.tasks import (
    MAX_QUESTION_CHARS,
    AnswerFilesResponse,
    AnswerRequest,
    Citation,
    SummarizeFilesResponse,
    SummarizeRequest,
)
from service.tasks.answer import Answer, answer_plan, answer_source
from service.tasks.documents import document_plan
from service.tasks.summarize import Summary

MAX_FILES = 8  # per request
MAX_UPLOAD_BYTES = MAX_FILES * documents.MAX_BYTES  # one request's body (`service.server.app`'s BodyLimit)
STREAMED = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream: server-sent events"}
} | responses(400, 401, 413, 415, 422, 429, 500, 503, 504)
FILES = File(description=f"1 to {MAX_FILES} documents: {', '.join(documents.SUPPORTED)} (type from content and name)")

router = APIRouter(prefix="/v1", tags=["Answers and summaries"])


async def read_all(files: list[UploadFile]) -> list[documents.Document]:
    if not 1 <= len(files) <= MAX_FILES:
        raise InvalidRequest(f"send 1 to {MAX_FILES} files, got {len(files)}", param="files")
    out = []
    for f in files:
        data = await f.read()
        out.append(await asyncio.to_thread(documents.read, data, f.filename or "upload"))
    return out


@router.post("/summarize/files", response_model=SummarizeFilesResponse, responses=STREAMED)
async def summarize_files(
    request: Request,
    files: Annotated[list[UploadFile], FILES],
    length: Annotated[Literal["short", "medium", "long"], Form()] = "medium",
    max_words: Annotated[int | None, Form(ge=1, le=1_000)] = None,
    temperature: Annotated[float, Form(ge=0.0, le=2.0)] = 0.0,
    seed: Annotated[int | None, Form()] = None,
    stream: Annotated[bool, Form()] = False,
):
    """An abstractive summary of uploaded documents, read with their structure (a deck's slides, a
    workbook's sheets with their header rows, an e-mail's headers and attachments, a PDF's pages);
    past the context, groups of whole parts are summarized and then their summaries (map-reduce).
    `citations` gives each summary sentence's file and part, where one shares its words."""
    gen = request.app.state.gen
    docs = await read_all(files)
    text = "\n\n".join(d.text() for d in docs)
    plan = document_plan(gen, docs, length, max_words, temperature, seed)
    req = SummarizeRequest.model_construct(stream=stream, evaluate=None)

    def shape(s: Summary, scored) -> SummarizeFilesResponse:
        return SummarizeFilesResponse(
            summary=s.summary,
            citations=s.citations,
            scores=scored,
            model=gen.name,
            usage=usage(s.prompt_tokens, s.completion_tokens),
        )

    return await respond(req, plan, request, "summarize", text, shape)


@router.post("/answer/files", response_model=AnswerFilesResponse, responses=STREAMED)
async def answer_files(
    request: Request,
    question: Annotated[str, Form(min_length=1, max_length=MAX_QUESTION_CHARS)],
    files: Annotated[list[UploadFile], FILES],
    max_tokens: Annotated[int, Form(ge=1, le=1_000)] = 80,
    temperature: Annotated[float, Form(ge=0.0, le=2.0)] = 0.0,
    seed: Annotated[int | None, Form()] = None,
    stream: Annotated[bool, Form()] = False,
):
    """A direct answer in one full sentence from uploaded documents. They are cut into passages along
    their structure (slides, sheets, pages, sections, messages; long parts at paragraphs), the passages
    ranked for the question (BM25, fused with dense embeddings where installed), and the best
    (`service.retrieval.TOP`) answered from as `/v1/answer` does; `citation` names the file, part and
    characters the answer drew on."""
    gen = request.app.state.gen
    docs = await read_all(files)
    found = await asyncio.to_thread(lambda: retrieval.rank(question, retrieval.passages(docs)))
    passages = [p.text for p in found]
    plan = answer_plan(gen, question, passages, max_tokens, temperature, seed)
    req = AnswerRequest.model_construct(stream=stream, evaluate=None)

    def shape(a: Answer, scored) -> AnswerFilesResponse:
        p = None if a.passage_index is None else found[a.passage_index]
        return AnswerFilesResponse(
            answer=a.answer,
            scores=scored,
            passage_index=a.passage_index,
            citation=Citation(file=p.file, part=p.part, start=p.start, end=p.end, passage=p.text) if p else None,
            model=gen.name,
            usage=usage(a.prompt_tokens, a.completion_tokens),
        )

    return await respond(req, plan, request, "answer", answer_source(question, passages), shape)
