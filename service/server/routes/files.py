"""`/v1/files`: OpenAI's Files API, for the Batch API's input and output files (kept in the jobs' SQLite
store). Uploads are multipart (`file`, `purpose`), up to 64 MiB; only `purpose: batch` is taken."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from service.errors import InvalidRequest
from service.server.http_errors import found, responses

router = APIRouter(prefix="/v1/files", tags=["Files"])


@router.post("", responses=responses(400, 401, 413))
async def upload(request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict:
    """Upload a JSONL file of batch requests (`purpose: batch`)."""
    if purpose != "batch":
        raise InvalidRequest(f"purpose {purpose!r} is not supported: this server takes 'batch' files", param="purpose")
    return request.app.state.jobs.add_file(file.filename or "upload.jsonl", purpose, await file.read())


@router.get("", responses=responses(401))
def listing(request: Request) -> dict:
    """The uploaded files, newest first."""
    return {"object": "list", "data": request.app.state.jobs.files(), "has_more": False}


@router.get("/{file}", responses=responses(401, 404))
def describe(file: str, request: Request) -> dict:
    """A file's size, name and purpose (uploads and the output and error files of batches)."""
    return found(request.app.state.jobs.file, file, "File object")


@router.get("/{file}/content", responses=responses(401, 404))
def content(file: str, request: Request) -> Response:
    """A file's bytes (a batch's output or error file as JSONL, as far as it has run)."""
    return Response(found(request.app.state.jobs.content, file, "File object"), media_type="application/octet-stream")


@router.delete("/{file}", responses=responses(401, 404))
def delete(file: str, request: Request) -> dict:
    """Delete an uploaded file (batches made from it keep their records)."""
    return found(request.app.state.jobs.delete_file, file, "File object")
