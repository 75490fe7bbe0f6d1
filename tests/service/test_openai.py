"""The OpenAI-compatible API, driven by the official `openai` client against a live server on loopback."""

from __future__ import annotations

import asyncio

import openai
import pytest

from service.engine.sampling_params import SamplingParams
from service.server.app import build_app


@pytest.fixture(scope="module")
def client(tiny, serve, own_engine):
    with serve(build_app(own_engine(tiny))) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models(client):
    """/v1/models lists the served model the way the openai client expects."""
    assert [m.id for m in client.models.list().data] == ["tiny-random"]


def test_completion_with_usage(client, tiny):
    """A completion has OpenAI's shape and usage counts that match the tokens."""
    r = client.completions.create(model="tiny-random", prompt="Once upon a time", max_tokens=12, temperature=0)
    want = tiny.complete("Once upon a time", SamplingParams(max_tokens=12))
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode("Once upon a time"))


def test_echo_logprobs_score_the_prompt_like_nlg_score(client, tiny):
    """What evaluation harnesses do: echo=True, max_tokens=0, logprobs."""
    text = "The cat sat on the mat."
    r = client.completions.create(model="tiny-random", prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    want = tiny.prompt_logprobs(tiny.tokenizer.encode(text))
    assert r.choices[0].text == text and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([w.logprob for w in want[1:]], abs=1e-5)
    assert "".join(lp.tokens) == text and lp.text_offset[-1] == len(text) - len(lp.tokens[-1])


def test_stop_string_is_not_returned(client):
    """A stop string ends a completion and is not returned, finish_reason stop."""
    free = client.completions.create(model="tiny-random", prompt="abc", max_tokens=20, temperature=0).choices[0].text
    stop = free[3:5]
    r = client.completions.create(model="tiny-random", prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_stream_equals_chat(client):
    """A streamed chat completion's deltas join to the non-streamed message, with role first and usage last."""
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-random",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_streamed_completion_equals_completion(client):
    """A streamed completion's pieces join to the non-streamed text."""
    whole = client.completions.create(model="tiny-random", prompt="x", max_tokens=10, temperature=0, seed=1)
    parts = client.completions.create(model="tiny-random", prompt="x", max_tokens=10, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_models_retrieve(client):
    """client.models.retrieve finds the served model; another name is 404."""
    assert client.models.retrieve("tiny-random").id == "tiny-random"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_token_id_lists_and_n(client, tiny):
    """What lm-evaluation-harness sends: a list of token-id lists (was 422); each prompt gets n choices,
    indexed prompt-major, equal to the prompt sent alone."""
    prompts = [tiny.tokenizer.encode(t) for t in ("Once upon", "a time")]
    r = client.completions.create(model="tiny-random", prompt=prompts, max_tokens=6, temperature=0, n=2)
    want = [client.completions.create(model="tiny-random", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [w.choices[0].text for w in want for _ in range(2)]
    assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_max_tokens_past_the_old_cap(client):
    """max_tokens may use the context (8192 for SmolLM2), not a fixed 1024."""
    r = client.completions.create(
        model="tiny-random", prompt="a", max_tokens=1100, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 1100 and r.choices[0].finish_reason == "length"


def test_content_parts_and_the_developer_role(client):
    """Content as a list of text parts equals the same text as a string; developer is the system role."""
    as_text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    as_parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
    ]
    a, b = (
        client.chat.completions.create(model="tiny-random", messages=m, max_tokens=8, temperature=0)
        for m in (as_text, as_parts)
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_parameters_that_ask_for_nothing_are_accepted(client):
    """tools: [], tool_choice: "none" and parallel_tool_calls: false (sent by clients that always send
    them) ask for nothing: accepted, the same answer as without them (they were "unrecognized")."""
    args = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    plain = client.chat.completions.create(**args)
    nothing = client.chat.completions.create(**args, tools=[], tool_choice="none", parallel_tool_calls=False)
    assert nothing.choices[0].message.content == plain.choices[0].message.content


def test_penalties_and_logit_bias_are_applied(client, tiny):
    """presence/frequency penalties and logit_bias change the tokens, not ignored (their arithmetic is
    checked against a plain loop in test_sampling): a +100 bias makes every greedy token that token."""
    token = tiny.tokenizer.encode("q")[0]
    r = client.completions.create(
        model="tiny-random", prompt="x", max_tokens=5, temperature=0, logit_bias={str(token): 100}
    )
    assert r.choices[0].text == "q" * 5
    args = {"model": "tiny-random", "prompt": "the the the", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args, frequency_penalty=2).choices[0].text != plain


def test_a_consumer_that_goes_away_stops_generation(tiny):
    """Client disconnect: the consumer closes the request's stream of pieces, generation stops within a
    token (the handle aborts the sequences on the way out)."""
    from service.engine.handle import AsyncEngine

    seen = []
    engine = tiny.engine.start(slots=2)
    try:

        async def consume_one():
            running = AsyncEngine(tiny).start(
                [tiny.tokenizer.encode("go")], [SamplingParams(max_tokens=500, ignore_eos=True)]
            )
            pieces = running.pieces()
            seen.append(await anext(pieces))
            await pieces.aclose()
            return running.generation.seqs[0]

        seq = asyncio.run(consume_one())
        assert seq.done.wait(10)  # the generation finishes soon after the abort
    finally:
        engine.stop()
    assert seen and isinstance(seen[0], tuple)
    assert len(seq.output) < 20 and seq.finish_reason == "cancelled"  # not the 500 asked for


def test_streamed_multibyte_text_never_splits_a_character(client, tiny, monkeypatch):
    """Force the engine to emit a script of byte tokens (each multibyte character is 2-4 of them) and
    read it back through the server's SSE stream."""
    text = "naïve café — 世界 😀 done"
    script = iter(tiny.tokenizer.encode(text))
    from service.engine.sampler import Sampler

    monkeypatch.setattr(Sampler, "pick", lambda self, seqs, logits: [next(script, 2) for _ in seqs])
    parts = client.completions.create(model="tiny-random", prompt="x", max_tokens=64, stream=True)
    pieces = [p.choices[0].text for p in parts]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it really streamed in pieces


def test_a_response_message_sent_back_is_accepted(client):
    """A message taken from a response and sent back with the next turn (with OpenAI's empty fields such as
    refusal: null, tool_calls: []) is accepted; so is a real tool call (tool calls are served now); a legacy
    function_call is refused by name."""
    first = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    echoed = first.choices[0].message.model_dump() | {"refusal": None, "tool_calls": [], "annotations": []}
    history = [{"role": "user", "content": "hi"}, echoed, {"role": "user", "content": "and?"}]
    assert client.chat.completions.create(model="tiny-random", messages=history, max_tokens=4).choices
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    called = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": [call]}]
    assert client.chat.completions.create(model="tiny-random", messages=called, max_tokens=4).choices
    legacy = {"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError, match="function_call"):
        client.chat.completions.create(model="tiny-random", messages=[legacy], max_tokens=4)
