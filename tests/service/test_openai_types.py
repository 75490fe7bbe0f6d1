"""Real responses checked against the `openai` package's own types and against the response models our
OpenAPI document declares (so the docs do not promise a shape we do not send); the async client, streaming
and not, with requests in flight together."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from service.server.schemas import openai_responses as ours

M = "tiny-random"
CHAT = {"model": M, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}


def test_responses_match_openai_types_and_our_spec(url):
    """Completions (with echoed logprobs), chat (with logprobs), stream chunks and models validate as the
    openai package's types and as our declared response models."""
    completion = {"model": M, "prompt": "Once", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    echoed = httpx.post(f"{url}/v1/completions", json=completion | {"echo": True}).json()
    # an echoed prompt's first token has no log-probability: null, as OpenAI sent it, which the openai
    # package's type (a list of floats) does not allow; its client does not validate, so it reads it
    assert echoed["choices"][0]["logprobs"]["token_logprobs"][0] is None and ours.Completion.model_validate(echoed)
    pairs = [
        (httpx.post(f"{url}/v1/completions", json=completion).json(), Completion, ours.Completion),
        (
            httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"logprobs": True, "top_logprobs": 2}).json(),
            ChatCompletion,
            ours.ChatCompletion,
        ),
        (httpx.get(f"{url}/v1/models/{M}").json(), Model, ours.Model),
        (httpx.get(f"{url}/v1/models").json()["data"][0], Model, ours.Model),
    ]
    for body, theirs, declared in pairs:
        assert theirs.model_validate(body).model_dump(exclude_unset=True) and declared.model_validate(body), body
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=CHAT | {"stream": True, "logprobs": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(json.loads(event))


def test_the_async_client_streams_and_waits_concurrently(url, tiny):
    """openai.AsyncOpenAI: a streamed chat and plain completions in flight together each equal the same
    request alone (greedy)."""

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def streamed() -> str:
            parts = await client.chat.completions.create(**CHAT, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in parts if c.choices])

        async def plain(prompt: str) -> str:
            r = await client.completions.create(model=M, prompt=prompt, max_tokens=8, temperature=0)
            return r.choices[0].text

        together = await asyncio.gather(streamed(), plain("a"), plain("b"))
        alone = [await streamed(), await plain("a"), await plain("b")]
        await client.close()
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone
