"""OpenAI-compatible endpoints: `/v1/completions` (with `logprobs` and `echo`, so evaluation harnesses
can score prompts), `/v1/chat/completions`, both streaming as server-sent events (`data: [DONE]`,
`stream_options.include_usage`), and `/v1/models`.

Handlers (module-level) talk to the engine through the app's async handle (`request.app.state.handle`). Tokenizing
and chat templates run on a worker thread, after a constant-time bound refuses a text that could never
fit the context; every error known before the first token (a prompt out of the vocabulary, too long,
too many prompts, a full queue) is an HTTP status, never an event in a 200 stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, HTTPException, Request

from service.engine.generator import TextGenerator, TextResult
from service.engine.sampling import SamplingParams
from service.engine.sequence import TokenLogprob
from service.errors import ContextOverflow
from service.server.schemas.openai import ChatRequest, CompletionRequest
from service.server.streams import sse

CHAT_MAX_TOKENS = 512  # default for chat when the request sets none (less if the context is shorter)
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream: server-sent events"}}


router = APIRouter(prefix="/v1")


def check_model(gen: TextGenerator, name: str) -> None:
    if name != gen.name:
        raise HTTPException(404, f"model {name!r} not found: this server serves {gen.name!r}")


def bound(gen: TextGenerator, texts: list[str], max_tokens: int) -> None:
    """Refuse, without tokenizing, a text that has more tokens than the context for sure."""
    context = gen.engine.context
    for text in texts:
        least = gen.tokenizer.least_tokens(text)
        if least + max_tokens > context:
            raise ContextOverflow(
                f"the prompt has at least {least} tokens and max_tokens is {max_tokens}: "
                f"more than the context of {context} tokens",
                param="prompt",
            )


def params(req, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stops(),
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
    )


def header(gen: TextGenerator, prefix: str, kind: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": gen.name}


@router.get("/models")
def models(request: Request) -> dict:
    gen = request.app.state.gen
    card = {"id": gen.name, "object": "model", "created": 0, "owned_by": "nlg", "max_model_len": gen.engine.context}
    return {"object": "list", "data": [card]}


@router.post("/completions", responses=STREAMED)
async def completions(req: CompletionRequest, request: Request):
    gen, handle = request.app.state.gen, request.app.state.handle
    tok, engine = gen.tokenizer, gen.engine
    check_model(gen, req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else req.prompt
    bound(gen, [p for p in prompts if isinstance(p, str)], req.max_tokens)
    ids = await asyncio.to_thread(lambda: [p if isinstance(p, list) else tok.encode(p) for p in prompts])
    for p in ids:
        engine.check_prompt(p, req.max_tokens)
    sp = params(req, req.max_tokens, req.logprobs) if req.max_tokens else None
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": gen.name,
    }
    prompt_lp = [None] * len(ids)
    if req.echo:
        prompt_lp = [await handle.call(partial(engine.score, p, req.logprobs or 0)) for p in ids]
    running = handle.start(ids, [sp] * len(ids), request_id=head["id"], stream=req.stream) if sp else None

    def choice(i: int, r: TextResult | None) -> dict:
        text = r.text if r else ""
        lp = None
        if req.logprobs is not None:
            pairs = list(zip(ids[i], prompt_lp[i] or [])) if req.echo else []
            pairs += list(zip(r.token_ids, r.logprobs)) if r else []
            lp = legacy_logprobs(tok, pairs, req.logprobs)
        return {
            "index": i,
            "text": (tok.decode(ids[i]) if req.echo else "") + text,
            "logprobs": lp,
            "finish_reason": r.finish_reason if r else "length",
        }

    if not req.stream:
        results = await running.wait(request.is_disconnected) if running else [None] * len(ids)
        return head | {"choices": [choice(i, r) for i, r in enumerate(results)], "usage": usage(ids, results)}

    def piece(i: int, text: str, finish: str | None = None) -> dict:
        return head | {"choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

    async def events() -> AsyncIterator[dict]:
        if req.echo:
            for i, p in enumerate(ids):
                yield piece(i, tok.decode(p))
        results = [None] * len(ids)
        if running:
            async for i, text in running.pieces():
                yield piece(i, text)
            results = running.result
        for i, r in enumerate(results):
            yield piece(i, "", r.finish_reason if r else "length")
        if req.stream_options and req.stream_options.include_usage:
            yield head | {"choices": [], "usage": usage(ids, results)}

    return sse(events(), on_close=partial(handle.abort, head["id"]))


@router.post("/chat/completions", responses=STREAMED)
async def chat(req: ChatRequest, request: Request):
    gen = request.app.state.gen
    check_model(gen, req.model)
    limit = req.max_completion_tokens or req.max_tokens
    messages = [m.model_dump() for m in req.messages]
    bound(gen, ["".join(m["content"] for m in messages)], limit or 1)
    ids = await asyncio.to_thread(gen.tokenizer.chat, messages)
    max_tokens = limit or max(1, min(CHAT_MAX_TOKENS, gen.engine.context - len(ids)))
    gen.engine.check_prompt(ids, max_tokens)
    handle = request.app.state.handle
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": gen.name,
    }
    running = handle.start([ids], [params(req, max_tokens)], request_id=head["id"], stream=req.stream)

    if not req.stream:
        r = (await running.wait(request.is_disconnected))[0]
        message = {"role": "assistant", "content": r.text}
        return head | {
            "choices": [{"index": 0, "message": message, "finish_reason": r.finish_reason}],
            "usage": usage([ids], [r]),
        }

    chunk = head | {"object": "chat.completion.chunk"}

    def delta(d: dict, finish: str | None = None) -> dict:
        return chunk | {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    async def events() -> AsyncIterator[dict]:
        yield delta({"role": "assistant", "content": ""})
        async for _, text in running.pieces():
            yield delta({"content": text})
        r = running.result[0]
        yield delta({}, r.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk | {"choices": [], "usage": usage([ids], [r])}

    return sse(events(), on_close=partial(handle.abort, head["id"]))


def usage(prompts: list[list[int]], results: list[TextResult | None]) -> dict:
    prompt = sum(map(len, prompts))
    completion = sum(r.completion_tokens for r in results if r is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def legacy_logprobs(tok, pairs: list[tuple[int, TokenLogprob | None]], top: int) -> dict:
    """The completions API's logprobs object: one entry per token of the returned text (prompt tokens
    first when echoed; the very first token has no log-probability)."""
    ids = [i for i, _ in pairs]
    tokens = tok.tokens(ids)
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for _, lp in pairs],
        "top_logprobs": [
            None if lp is None or not top else {tok.tokens([i])[0]: v for i, v in lp.top} for _, lp in pairs
        ],
        "text_offset": offsets,
    }
