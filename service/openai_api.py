"""OpenAI-compatible endpoints: `/v1/completions` (with `logprobs` and `echo`, so evaluation harnesses
can score prompts), `/v1/chat/completions`, both streaming as server-sent events (`data: [DONE]`,
`stream_options.include_usage`), and `/v1/models`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from service.generate import TextGenerator, TextResult
from service.openai_schemas import ChatRequest, CompletionRequest
from service.sampling import SamplingParams
from service.sequence import TokenLogprob
from service.streams import Done, complete, stream

CHAT_MAX_TOKENS = 512  # default for chat when the request sets none (less if the context is shorter)


def build_router(gen: TextGenerator, timeout: float | None = None) -> APIRouter:
    router = APIRouter(prefix="/v1")
    tok = gen.tokenizer

    def check_model(name: str) -> None:
        if name != gen.name:
            raise HTTPException(404, f"model {name!r} not found: this server serves {gen.name!r}")

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

    @router.get("/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": gen.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "nlg",
                    "max_model_len": gen.engine.context,
                }
            ],
        }

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else req.prompt
        ids = [p if isinstance(p, list) else tok.encode(p) for p in prompts]
        for p in ids:
            gen.engine.check_fits(len(p), req.max_tokens)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": gen.name,
        }

        def choice(i: int, r: TextResult | None, prompt_lp) -> dict:
            text = r.text if r else ""
            lp = None
            if req.logprobs is not None:
                pairs = list(zip(ids[i], prompt_lp or [])) if req.echo else []
                pairs += list(zip(r.token_ids, r.logprobs)) if r else []
                lp = legacy_logprobs(tok, pairs, req.logprobs)
            return {
                "index": i,
                "text": (tok.decode(ids[i]) if req.echo else "") + text,
                "logprobs": lp,
                "finish_reason": r.finish_reason if r else "length",
            }

        def work(push=None, cancelled=None):
            prompt_lp = (
                [gen.engine.prompt_logprobs(p, req.logprobs or 0) for p in ids] if req.echo else [None] * len(ids)
            )
            if req.max_tokens == 0:
                return [None] * len(ids), prompt_lp
            sp = params(req, req.max_tokens, req.logprobs)
            on_text = (lambda i, piece: push((i, piece))) if push else None
            return gen.generate(ids, [sp] * len(ids), on_text, cancelled), prompt_lp

        if not req.stream:
            results, prompt_lp = await complete(work, request, timeout)
            choices = [choice(i, r, prompt_lp[i]) for i, r in enumerate(results)]
            return head | {"choices": choices, "usage": usage(ids, results)}

        async def events() -> AsyncIterator[dict]:
            if req.echo:
                for i, p in enumerate(ids):
                    yield head | {
                        "choices": [{"index": i, "text": tok.decode(p), "logprobs": None, "finish_reason": None}]
                    }
            async for item in stream(work):
                if isinstance(item, Done):
                    results, _ = item.result
                    for i, r in enumerate(results):
                        yield head | {
                            "choices": [
                                {
                                    "index": i,
                                    "text": "",
                                    "logprobs": None,
                                    "finish_reason": r.finish_reason if r else "length",
                                }
                            ]
                        }
                    if req.stream_options and req.stream_options.include_usage:
                        yield head | {"choices": [], "usage": usage(ids, results)}
                else:
                    i, piece = item
                    yield head | {"choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}]}

        return sse(events())

    @router.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        ids = tok.chat([m.model_dump() for m in req.messages])
        limit = req.max_completion_tokens or req.max_tokens
        max_tokens = limit or max(1, min(CHAT_MAX_TOKENS, gen.engine.context - len(ids)))
        gen.engine.check_fits(len(ids), max_tokens)
        sp = params(req, max_tokens)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": gen.name,
        }

        def work(push=None, cancelled=None):
            on_text = (lambda i, piece: push(piece)) if push else None
            return gen.generate([ids], [sp], on_text, cancelled)[0]

        if not req.stream:
            r = await complete(work, request, timeout)
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
            async for item in stream(work):
                if isinstance(item, Done):
                    yield delta({}, item.result.finish_reason)
                    if req.stream_options and req.stream_options.include_usage:
                        yield chunk | {"choices": [], "usage": usage([ids], [item.result])}
                else:
                    yield delta({"content": item})

        return sse(events())

    return router


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:  # headers are gone: report in the stream, OpenAI style
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': type(e).__name__}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


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
