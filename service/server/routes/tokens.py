"""vLLM's `/tokenize` and `/detokenize`: what a front-end needs to count and cut text by the served model's
own tokens (a prompt's length against the context, a budget of tokens) without loading a tokenizer itself.
Both run on a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, model_validator

from service.server.http_errors import responses
from service.server.routes.openai import check_model
from service.server.schemas.base import Body
from service.server.schemas.openai import Message, Tool

router = APIRouter(tags=["OpenAI-compatible"], responses=responses(400, 401, 404))
MAX_TEXT = 2_000_000  # characters: about what the largest context holds, and no more work than a prompt


class TokenizeRequest(Body):
    """A text (`prompt`) or a conversation (`messages`, through the chat template, with its tools)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    messages: list[Message] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    return_token_strs: bool = Field(False, description="each token's text too")

    @model_validator(mode="after")
    def one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send a prompt or messages, one of them")
        return self


class DetokenizeRequest(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_TEXT)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    """The tokens of a prompt, or of a conversation as the chat template writes it for the assistant's turn."""
    gen = request.app.state.gen
    if req.model is not None:
        check_model(gen, req.model)
    tok = gen.tokenizer
    if req.messages is None:
        ids = await asyncio.to_thread(tok.encode, req.prompt)
    else:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
        ids = await asyncio.to_thread(tok.chat, [m.for_template() for m in req.messages], tools)
    out = {"count": len(ids), "max_model_len": gen.engine.context, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = await asyncio.to_thread(tok.tokens, ids)
    return out


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    """The text of token ids (ids outside the vocabulary are a 400 naming its size)."""
    gen = request.app.state.gen
    if req.model is not None:
        check_model(gen, req.model)
    gen.engine.limits.check_tokens(req.tokens, param="tokens")
    return {"prompt": await asyncio.to_thread(gen.tokenizer.decode, req.tokens)}
