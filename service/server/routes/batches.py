"""`/v1/batches`: OpenAI's Batch API. A batch is an uploaded JSONL file of requests
(`{"custom_id", "method": "POST", "url", "body"}` per line) to one endpoint, `/v1/chat/completions` or
`/v1/completions`; the jobs runner sends each line to that endpoint in process, behind interactive
requests, and the batch's output and error files are OpenAI's JSONL (`custom_id`, `response.status_code`,
`response.body`). It is kept in the jobs' SQLite store and resumes after a restart like every job. The
file is checked when the batch is created: a line that could never run is a 400 naming it.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field

from service import nesting
from service.errors import InvalidRequest
from service.jobs.jsonl import split_lines
from service.server.http_errors import found, responses
from service.server.schemas.base import Body

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")

router = APIRouter(prefix="/v1/batches", tags=["Batches"])


class BatchRequest(Body):
    input_file_id: str = Field(description="an uploaded file (purpose batch)")
    endpoint: str = Field(description="/v1/chat/completions or /v1/completions", examples=["/v1/chat/completions"])
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


def check_lines(content: bytes, endpoint: str) -> None:
    """Every line a request to `endpoint` with a unique custom_id and a JSON body that does not stream."""
    try:
        lines = split_lines(content.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("the input file is not UTF-8 text", param="input_file_id") from None
    seen = set()
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = nesting.loads(text)
        except InvalidRequest as e:
            raise InvalidRequest(f"line {n} of the input file: {e}", param="input_file_id") from None
        if (
            not isinstance(line, dict)
            or not isinstance(line.get("custom_id"), str)
            or not isinstance(line.get("body"), dict)
        ):
            raise InvalidRequest(f"line {n} needs a custom_id (string) and a body (object)", param="input_file_id")
        if line.get("method", "POST") != "POST" or line.get("url") != endpoint:
            raise InvalidRequest(
                f"line {n}: every request must be POST {endpoint}, the batch's endpoint", param="input_file_id"
            )
        if line["body"].get("stream"):
            raise InvalidRequest(f"line {n}: a batch request cannot stream", param="input_file_id")
        if line["custom_id"] in seen:
            raise InvalidRequest(f"line {n}: custom_id {line['custom_id']!r} is used twice", param="input_file_id")
        seen.add(line["custom_id"])
    if not seen:
        raise InvalidRequest("the input file has no requests", param="input_file_id")


@router.post("", responses=responses(400, 401, 404))
def create(req: BatchRequest, request: Request) -> dict:
    """Run every request of an uploaded file against one endpoint, in the background."""
    if req.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"endpoint {req.endpoint!r} is not supported: this server runs batches of {', '.join(ENDPOINTS)}",
            param="endpoint",
        )
    store = request.app.state.jobs
    check_lines(found(store.content, req.input_file_id, "File object"), req.endpoint)
    batch = store.create_batch(req.input_file_id, req.endpoint, req.completion_window, req.metadata)
    request.app.state.runner.wake.set()
    return batch


@router.get("", responses=responses(400, 401))
def listing(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
    """The batches, newest first (`after` a batch id, at most `limit`)."""
    data = request.app.state.jobs.batches()
    if after is not None:
        ids = [b["id"] for b in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    page = data[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(data) > limit,
    }


@router.get("/{batch}", responses=responses(401, 404))
def retrieve(batch: str, request: Request) -> dict:
    """A batch's status, request counts and output and error files."""
    return found(request.app.state.jobs.batch, batch, "Batch object")


@router.post("/{batch}/cancel", responses=responses(401, 404))
def cancel(batch: str, request: Request) -> dict:
    """Cancel a batch: requests not started are not run."""
    store = request.app.state.jobs
    found(store.batch, batch, "Batch object")
    store.cancel(batch)
    return store.batch(batch)
