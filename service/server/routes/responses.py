"""OpenAI's Responses API, stateless (`POST /v1/responses`): text in, text out, mapped onto chat.

`input` is a text or a list of messages (roles user, assistant, system, developer; content a text or
`input_text` / `output_text` parts), `instructions` the system message before them; `max_output_tokens`,
`temperature`, `top_p` as in chat, and `text.format` (`json_schema`, `json_object`) a structured output.
Nothing is stored: `store` is accepted and means nothing here, `previous_response_id` and `background` are
refused by name, and so are tools (use chat completions for them). Streamed, the events are the API's:
`response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`, `response.completed` (or `response.incomplete` when `max_output_tokens` cut
it), each with its `sequence_number`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, model_validator

from service.engine.sampling_params import SamplingParams
from service.server.routes.openai import CHAT_MAX_TOKENS, GENERATES, bound, check_model, compiled
from service.server.schemas.base import Body
from service.server.schemas.openai import OpenAIBody
from service.server.streams import sse

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


class Part(Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]

    def for_template(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(Body):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIBody):
    model: str
    input: str | list[InputMessage] = Field(description="a text, or a list of messages")
    instructions: str | None = Field(None, description="the system message, before the input")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = Field(None, description="accepted; nothing is stored (this API is stateless here)")
    text: TextConfig | None = None
    previous_response_id: None = Field(None, description="not supported: send the whole conversation in input")
    background: Literal[False] | None = None
    tools: list[None] | None = Field(None, max_length=0, description="not supported here: use chat completions")
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def some_input(self):
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: an empty list of messages (send a text or at least one message)")
        return self


def _messages(req: ResponsesRequest) -> list[dict[str, str]]:
    given = (
        [{"role": "user", "content": req.input}]
        if isinstance(req.input, str)
        else [m.for_template() for m in req.input]
    )
    return ([{"role": "system", "content": req.instructions}] if req.instructions else []) + given


def _format(req: ResponsesRequest) -> tuple[str, dict] | None:
    f = req.text.format if req.text else None
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return "json_schema", {"type": "object"}
    return "json_schema", f.json_schema or {}


@router.post("/responses", responses=GENERATES)
async def responses(req: ResponsesRequest, request: Request):
    """A model response to `input` (and `instructions`), as OpenAI's Responses API shapes it; stateless."""
    gen, handle = request.app.state.gen, request.app.state.handle
    check_model(gen, req.model)
    messages = _messages(req)
    bound(gen, ["".join(m["content"] for m in messages)], req.max_output_tokens or 1)
    ids = await asyncio.to_thread(gen.tokenizer.chat, messages)
    max_tokens = req.max_output_tokens or max(1, min(CHAT_MAX_TOKENS, gen.engine.context - len(ids)))
    gen.engine.limits.check_prompt(ids, max_tokens)
    asked = _format(req)
    grammar = None if asked is None else await compiled(gen, *asked)
    sp = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, grammar=grammar)
    rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    running = handle.start([ids], [sp], request_id=rid, stream=req.stream)
    created = int(time.time())

    def body(status: str, text: str | None, r=None) -> dict:
        out = []
        if text is not None:
            part = {"type": "output_text", "text": text, "annotations": []}
            out = [{"type": "message", "id": mid, "status": status, "role": "assistant", "content": [part]}]
        usage = None
        if r is not None:
            usage = {
                "input_tokens": len(ids),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": r.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(ids) + r.completion_tokens,
            }
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": gen.name,
            "output": out,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "text": {
                "format": (
                    req.text.format.model_dump(by_alias=True, exclude_none=True)
                    if req.text and req.text.format
                    else {"type": "text"}
                )
            },
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "store": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": usage,
            "metadata": req.metadata or {},
        }

    def ended(r) -> str:
        return "incomplete" if r.finish_reason == "length" else "completed"

    if not req.stream:
        r = (await running.wait(request.is_disconnected))[0]
        return body(ended(r), r.text, r)

    async def events() -> AsyncIterator[dict]:
        n = iter(range(1 << 62))

        def event(kind: str, **fields) -> dict:
            return {"type": f"response.{kind}", "sequence_number": next(n)} | fields

        yield event("created", response=body("in_progress", None))
        yield event("in_progress", response=body("in_progress", None))
        item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
        yield event("output_item.added", output_index=0, item=item)
        empty = {"type": "output_text", "text": "", "annotations": []}
        yield event("content_part.added", item_id=mid, output_index=0, content_index=0, part=empty)
        text = ""
        async for p in running.pieces():
            text += p.text
            yield event("output_text.delta", item_id=mid, output_index=0, content_index=0, delta=p.text, logprobs=[])
        r = running.result[0]
        done = {"type": "output_text", "text": r.text, "annotations": []}
        yield event("output_text.done", item_id=mid, output_index=0, content_index=0, text=r.text, logprobs=[])
        yield event("content_part.done", item_id=mid, output_index=0, content_index=0, part=done)
        status = ended(r)
        item = {"type": "message", "id": mid, "status": status, "role": "assistant", "content": [done]}
        yield event("output_item.done", output_index=0, item=item)
        yield event("completed" if status == "completed" else "incomplete", response=body(status, r.text, r))

    return sse(events(), on_close=partial(handle.abort, rid), named=True)
