"""`/v1/jobs`: the tasks' batch jobs over HTTP (OpenAI's Batch API, with its own JSONL, is `/v1/batches`).

`POST /v1/jobs?task=summarize|answer` takes JSONL (one record per line, as `nlg batch` reads);
`GET /v1/jobs/{id}` gives the state and counts; `GET /v1/jobs/{id}/results` the results as
JSONL (one line per input line: the fields, or `error`); `DELETE /v1/jobs/{id}` cancels it. The
store and its runner are the app's (`app.state.jobs`, `app.state.runner`).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from service.jobs.jsonl import split_lines
from service.server.http_errors import found, responses

MAX_JOB_BYTES = 64 * 1024 * 1024

router = APIRouter(prefix="/v1/jobs", tags=["Task jobs"])


@router.post("", responses=responses(400, 401, 413))
async def create(request: Request, task: str = Query(pattern="^(summarize|answer)$")) -> dict:
    """A job of one task over a JSONL body, one record per line (`{document, length?, max_words?}` or
    `{question, passages?}`, optional `id`); it runs in the background, behind interactive requests. A
    record that is not JSON, or nests more than 64 levels deep, gets its error row."""
    try:
        lines = split_lines((await request.body()).decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPException(400, "the batch is not UTF-8 text") from None
    store = request.app.state.jobs
    job = store.create(task, lines)  # 400 when no line holds a record
    request.app.state.runner.wake.set()
    return store.status(job)


@router.get("/{job}", responses=responses(401, 404))
def status(job: str, request: Request) -> dict:
    """The job's state and counts."""
    return found(request.app.state.jobs.status, job, "job")


@router.get("/{job}/results", responses=responses(401, 404))
def results(job: str, request: Request) -> Response:
    """The results so far as JSONL: one line per input line, its fields or its `error`."""
    rows = found(request.app.state.jobs.results, job, "job")
    return Response("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), media_type="application/x-ndjson")


@router.delete("/{job}", responses=responses(401, 404))
def cancel(job: str, request: Request) -> dict:
    """Cancel the job: records not started are not run."""
    return found(request.app.state.jobs.cancel, job, "job")
