"""OpenAI-compatible endpoints: `/v1/completions` (with `logprobs` and `echo`, so evaluation harnesses can
score prompts), `/v1/chat/completions` (with `logprobs`/`top_logprobs`), both streaming as server-sent
events (`data: [DONE]`, `stream_options.include_usage`, log-probabilities in every chunk), `/v1/models`
and `/v1/models/{id}`.

Handlers (module-level) talk to the engine through the app's async handle (`request.app.state.handle`).
Tokenizing and chat templates run on a worker thread, after a constant-time bound refuses a text that
could never fit the context; every error known before the first token (a prompt out of the vocabulary,
too long, too many prompts, a full queue) is an HTTP status, never an event in a 200 stream. An echoed
prompt is scored by the same prefill that starts its generation, batched with every other request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, HTTPException, Request

from service.engine.generator import TextGenerator, TextResult
from service.engine.handle import Piece, Running
from service.engine.sampling_params import SamplingParams
from service.errors import ContextOverflow, InvalidRequest
from service.server import tools
from service.server.http_errors import responses
from service.server.logprobs import Aligned, chat_logprobs, completion_logprobs
from service.server.schemas import openai_responses as out
from service.server.schemas.openai import ChatRequest, CompletionRequest, Sampling
from service.server.streams import sse

COMPILE_S = 10.0  # the longest a request waits for its grammar to compile
CHAT_MAX_TOKENS = 512  # default for chat when the request sets none (less if the context is shorter)
GENERATES = responses(400, 401, 404, 413, 429, 500, 503, 504)


def streamed(model) -> dict:
    """A 200 that is JSON (`model`) or, with stream: true, server-sent events."""
    text = "JSON, or with `stream: true` server-sent events (`data: {chunk}` ... `data: [DONE]`)"
    return {200: {"model": model, "description": text, "content": {"text/event-stream": {}}}} | GENERATES


router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


def check_model(gen: TextGenerator, name: str) -> None:
    if name != gen.name:
        raise HTTPException(404, f"The model '{name}' does not exist: this server serves '{gen.name}'")


def bound(gen: TextGenerator, texts: list[str], max_tokens: int) -> None:
    """Refuse, without tokenizing, a text that has more tokens than the context for sure."""
    context = gen.engine.context
    for text in texts:
        least = gen.tokenizer.least_tokens(text)
        if least + max_tokens > context:
            raise ContextOverflow.too_long(context, least, max_tokens, at_least=True)


async def grammar(gen: TextGenerator, req: Sampling) -> str | None:
    """The checked grammar of the request's structured output or of the tool calls it requires, if any:
    compiled on a worker thread (neither the event loop nor the engine waits for it); a schema or grammar
    that cannot be used, or both at once, is a 400 naming what is wrong."""
    asked = req.constraint()
    calls = tools.forced(req, gen.tokenizer.is_token(tools.OPEN)) if isinstance(req, ChatRequest) else None
    if asked is not None and calls is not None:
        raise InvalidRequest(
            "tool_choice requires tool calls: a structured output cannot be asked too", param="tool_choice"
        )
    if calls is not None:
        asked = ("grammar", calls)
    return None if asked is None else await compiled(gen, *asked)


async def compiled(gen: TextGenerator, kind: str, spec) -> str:
    """`Grammars.compile` on a worker thread, waited for at most `COMPILE_S` (a 400 past it: llguidance's
    own limits bound the work, this bounds the wait)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(gen.grammars.compile, kind, spec), COMPILE_S)
    except asyncio.TimeoutError:
        raise InvalidRequest(
            f"the structured output took more than {COMPILE_S:g} s to compile: simplify the schema or grammar",
            param="response_format",
        ) from None


def params(
    req: Sampling,
    max_tokens: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: str | None = None,
):
    """The sampling parameters of each of the request's `n` choices: choice j of a seeded request draws
    with seed ^ j (choice 0 with the seed itself)."""
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.biases(),
            seed=None if req.seed is None else req.seed ^ j,
            stop=req.stops(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=req.ignore_eos,
            grammar=grammar,
        )
        for j in range(req.n)
    ]


def header(gen: TextGenerator, prefix: str, kind: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": gen.name}


def card(gen: TextGenerator) -> dict:
    return {"id": gen.name, "object": "model", "created": 0, "owned_by": "nlg", "max_model_len": gen.engine.context}


@router.get("/models", response_model=out.ModelList, responses=responses(401))
def models(request: Request) -> dict:
    """The served model (one per server)."""
    return {"object": "list", "data": [card(request.app.state.gen)]}


@router.get("/models/{model:path}", response_model=out.Model, responses=responses(401, 404))
def model(model: str, request: Request) -> dict:
    """The served model, by name (`client.models.retrieve`)."""
    gen = request.app.state.gen
    check_model(gen, model)
    return card(gen)


def usage(prompts: list[list[int]], results: list[TextResult | None]) -> dict:
    prompt = sum(map(len, prompts))
    completion = sum(r.completion_tokens for r in results if r is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Choice:
    """One choice's log-probabilities as its text grows (streamed or whole): the tokens its text covers,
    the echoed prompt's first. Without `wanted` (no logprobs asked for) it computes nothing."""

    def __init__(self, tok, prompt: list[int], echo: bool, wanted: bool):
        self.tok, self.aligned, self.wanted = tok, Aligned(tok), wanted
        self.prompt = prompt if echo else []
        self.text_bytes = sum(map(len, tok.token_bytes(self.prompt)))
        self.ids: list[int] = []  # the streamed pieces' tokens so far, and their log-probabilities
        self.lps: list = []
        self.prompt_lps: list = []

    def echo_text(self) -> str:
        return b"".join(self.tok.token_bytes(self.prompt)).decode("utf-8", "replace")

    def tokens(self, piece: str, ids: list[int], lps: list, prompt_lps: list) -> list:
        """The tokens (with their log-probabilities) that `piece`, the text that came next, covers."""
        if not self.wanted:
            return []
        self.text_bytes += len(piece.encode())
        return self.aligned.take(self.prompt + ids, (prompt_lps if self.prompt else []) + lps, self.text_bytes)

    def add(self, p: Piece) -> None:
        """Take a streamed piece's tokens and log-probabilities (its text is `covered` after)."""
        self.ids += p.token_ids
        self.lps += p.logprobs
        self.prompt_lps += p.prompt_logprobs

    def covered(self, text: str) -> list:
        """`tokens` of text streamed next, from the pieces' tokens so far."""
        return self.tokens(text, self.ids, self.lps, self.prompt_lps)

    def last(self, piece: str, r: TextResult | None) -> list:
        """The completions API's tokens of the end: those `piece` covers, then the end token if one ended
        the choice (it is in no text; OpenAI and vLLM list it, and harnesses that score a prompt with
        max_tokens 1 drop the last token, counting on it)."""
        if r is None:
            return self.tokens(piece, [], [], [])
        tokens = self.tokens(piece, r.token_ids, r.logprobs, r.prompt_logprobs)
        if self.wanted and r.end_token is not None and len(r.logprobs) > len(r.token_ids):
            tokens.append((r.end_token, self.tok.token_bytes([r.end_token])[0], self.aligned.chars, r.logprobs[-1]))
        return tokens


@router.post("/completions", responses=streamed(out.Completion))
async def completions(req: CompletionRequest, request: Request):
    """OpenAI's completions: continue each prompt (`n` choices each). `echo` with `logprobs` scores the
    prompt (`max_tokens: 0`: the prompt only), as evaluation harnesses do."""
    gen, handle = request.app.state.gen, request.app.state.handle
    tok, engine = gen.tokenizer, gen.engine
    check_model(gen, req.model)
    prompts = req.prompts()
    bound(gen, [p for p in prompts if isinstance(p, str)], req.max_tokens)
    ids = await asyncio.to_thread(lambda: [p if isinstance(p, list) else tok.encode(p) for p in prompts])
    for p in ids:
        engine.limits.check_prompt(p, req.max_tokens)
    head = header(gen, "cmpl", "text_completion")
    scored = req.echo and req.logprobs is not None
    runs = [p for p in ids for _ in range(req.n)]  # choice k is prompt k // n
    running = None
    if req.max_tokens or scored:
        sp = params(req, req.max_tokens, req.logprobs, req.logprobs if scored else None, await grammar(gen, req))
        running = handle.start(runs, sp * len(ids), request_id=head["id"], stream=req.stream)
    choices = [Choice(tok, p, req.echo, req.logprobs is not None) for p in runs]

    def logprobs(tokens: list) -> dict | None:
        return None if req.logprobs is None else completion_logprobs(tok, tokens, req.logprobs)

    if not req.stream:
        results = await running.wait(request.is_disconnected) if running else [None] * len(runs)
        out = []
        for k, (c, r) in enumerate(zip(choices, results)):
            text = r.text if r else ""
            tokens = c.last(text, r)
            out.append(
                {
                    "index": k,
                    "text": (c.echo_text() if req.echo else "") + text,
                    "logprobs": logprobs(tokens),
                    "finish_reason": r.finish_reason if r else "length",
                }
            )
        return head | {"choices": out, "usage": usage(ids, results)}

    def piece(k: int, text: str, tokens: list, finish: str | None = None) -> dict:
        choice = {"index": k, "text": text, "logprobs": logprobs(tokens), "finish_reason": finish}
        return head | {"choices": [choice]}

    echoed = [not req.echo] * len(runs)

    def echo(k: int) -> bool:
        """Whether choice k's echoed prompt is still to be sent: once, before its first generated text (its
        log-probabilities exist once the prompt is prefilled)."""
        due, echoed[k] = not echoed[k], True
        return due

    async def events() -> AsyncIterator[dict]:
        results: list = [None] * len(runs)
        if running:
            async for p in running.pieces():
                k, c = p.index, choices[p.index]
                c.add(p)
                if echo(k):
                    yield piece(k, c.echo_text(), c.covered(""))
                yield piece(k, p.text, c.covered(p.text))
            results = running.result
        for k, r in enumerate(results):
            finish = r.finish_reason if r else "length"
            if echo(k):
                yield piece(k, choices[k].echo_text(), choices[k].last("", r))
                yield piece(k, "", [], finish)
            else:
                yield piece(k, "", choices[k].last("", r), finish)
        if req.stream_options and req.stream_options.include_usage:
            yield head | {"choices": [], "usage": usage(ids, results)}

    return sse(events(), on_close=partial(handle.abort, head["id"]))


@router.post("/chat/completions", responses=streamed(out.ChatCompletion))
async def chat(req: ChatRequest, request: Request):
    """OpenAI's chat completions through the model's chat template."""
    gen, handle = request.app.state.gen, request.app.state.handle
    tok = gen.tokenizer
    check_model(gen, req.model)
    limit = req.max_completion_tokens or req.max_tokens
    messages = [m.for_template() for m in req.messages]
    offered = tools.offered(req, tok.takes_tools)
    bound(gen, ["".join(m["content"] for m in messages) + json.dumps(offered or "")], limit or 1)
    ids = await asyncio.to_thread(tok.chat, messages, offered)
    max_tokens = limit or max(1, min(CHAT_MAX_TOKENS, gen.engine.context - len(ids)))
    gen.engine.limits.check_prompt(ids, max_tokens)
    head = header(gen, "chatcmpl", "chat.completion")
    top = (req.top_logprobs or 0) if req.logprobs else None
    sp = params(req, max_tokens, top, grammar=await grammar(gen, req))
    running: Running = handle.start([ids] * req.n, sp, request_id=head["id"], stream=req.stream)
    choices = [Choice(tok, ids, echo=False, wanted=top is not None) for _ in range(req.n)]

    def logprobs(tokens: list) -> dict | None:
        return None if top is None else chat_logprobs(tok, tokens, top)

    def message(text: str, finish: str) -> tuple[dict, str]:
        """The reply as a message (its tool calls read out when tools were offered), and its finish reason."""
        content, calls = tools.parse(text) if offered else (text, [])
        if not calls:
            return {"role": "assistant", "content": content}, finish
        reply = {"role": "assistant", "content": content, "tool_calls": calls}
        return reply, "tool_calls" if finish == "stop" else finish

    if not req.stream:
        results = await running.wait(request.is_disconnected)
        out = []
        for j, (c, r) in enumerate(zip(choices, results)):
            reply, finish = message(r.text, r.finish_reason)
            lp = logprobs(c.tokens(r.text, r.token_ids, r.logprobs, []))
            out.append({"index": j, "message": reply, "logprobs": lp, "finish_reason": finish})
        return head | {"choices": out, "usage": usage([ids], results)}

    chunk = head | {"object": "chat.completion.chunk"}

    def delta(j: int, d: dict, tokens: list | None = None, finish: str | None = None) -> dict:
        lp = logprobs(tokens) if tokens else None
        return chunk | {"choices": [{"index": j, "delta": d, "logprobs": lp, "finish_reason": finish}]}

    held = [tools.Held() for _ in range(req.n)] if offered else None

    async def events() -> AsyncIterator[dict]:
        for j in range(req.n):
            yield delta(j, {"role": "assistant", "content": ""})
        async for p in running.pieces():
            choices[p.index].add(p)
            text = held[p.index].take(p.text) if held else p.text
            if text or not held:
                yield delta(p.index, {"content": text}, choices[p.index].covered(text))
        for j, r in enumerate(running.result):
            finish = r.finish_reason
            if held:
                text, calls = held[j].rest()
                if text:
                    yield delta(j, {"content": text})
                if calls:
                    listed = [{"index": k} | call for k, call in enumerate(calls)]
                    yield delta(j, {"tool_calls": listed})
                    finish = "tool_calls" if finish == "stop" else finish
            yield delta(j, {}, choices[j].tokens("", r.token_ids, r.logprobs, []), finish)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk | {"choices": [], "usage": usage([ids], running.result)}

    return sse(events(), on_close=partial(handle.abort, head["id"]))
