"""Log-probabilities through the official client line up with the text: tokens as bytes where a token is part
of a character, `text_offset` in characters of the returned text, no token past a stop string; streams
carry the same log-probabilities as whole responses; an echoed prompt is scored by one prefill, batched."""

from __future__ import annotations

import openai
import pytest

from model.tokenizer import spell
from service.engine.runner import ModelRunner
from service.engine.sampling_params import SamplingParams
from service.server.app import build_app

M = "tiny-random"
TEXT = "naïve café — 世界 😀 done"


@pytest.fixture(scope="module")
def client(tiny, serve, own_engine):
    with serve(build_app(own_engine(tiny))) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def unspell(token: str) -> bytes:
    if token.startswith("bytes:"):
        return bytes.fromhex(token[len("bytes:") :].replace("\\x", ""))
    return token.encode()


def test_echo_of_multibyte_text_lines_up(client, tiny):
    """Each token's bytes join to the prompt; a partial character is `bytes:\\x..`, never U+FFFD; each
    text_offset is where the token's first character starts in the returned text."""
    r = client.completions.create(model=M, prompt=TEXT, max_tokens=0, echo=True, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert text == TEXT
    assert b"".join(map(unspell, lp.tokens)).decode() == TEXT
    assert not any("\ufffd" in t for t in lp.tokens) and any(t.startswith("bytes:") for t in lp.tokens)
    at = 0
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert offset == len(TEXT.encode()[:at].decode("utf-8", "ignore"))
        at += len(unspell(token))
    assert max(lp.text_offset) < len(text)
    want = tiny.prompt_logprobs(tiny.tokenizer.encode(TEXT), 2)
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([w.logprob for w in want[1:]], abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])


def test_tokens_stop_where_the_text_stops(client):
    """With a stop string the text leaves the stop out, and so do the tokens: each listed token starts
    inside the text, and together they cover it."""
    free = client.completions.create(model=M, prompt="abc", max_tokens=20, temperature=0).choices[0].text
    stop = free[6:8]
    r = client.completions.create(model=M, prompt="abc", max_tokens=20, temperature=0, stop=[stop], logprobs=1)
    choice = r.choices[0]
    assert choice.text == free[: free.index(stop)] and choice.finish_reason == "stop"
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) == len(choice.text)


def test_streamed_completion_carries_the_same_logprobs(client):
    """Streaming completions no longer drop logprobs: the chunks' tokens and values join to the whole
    response's, echo included."""
    args = {"model": M, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "logprobs": 1, "echo": True}
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-6)


def test_chat_logprobs_whole_and_streamed(client):
    """Chat logprobs/top_logprobs: one entry per token with its bytes (joining to the message) and its
    alternatives; the stream's chunks carry the same entries."""
    args = {"model": M, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**args, logprobs=True, top_logprobs=3).choices[0]
    content = whole.logprobs.content
    assert bytes(b for e in content for b in e.bytes).decode() == whole.message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    chunks = list(client.chat.completions.create(**args, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    plain = client.chat.completions.create(**args).choices[0]
    assert plain.logprobs is None and plain.message.content == whole.message.content


def test_echo_scoring_is_one_prefill_batched_with_others(tiny, monkeypatch):
    """An echoed prompt is scored by the prefill that starts its generation (it was scored by a separate
    forward on the engine thread, one request at a time, then prefilled again), and two scoring requests
    share one step."""
    fed = []
    real = ModelRunner.prefill

    def spy(self, chunks, cache):
        fed.append([(len(s.prompt), n) for s, n in chunks])
        return real(self, chunks, cache)

    monkeypatch.setattr(ModelRunner, "prefill", spy)
    a, b = (tiny.tokenizer.encode(t) for t in ("The cat sat on the mat.", "A dog ran."))
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    results = tiny.generate([a, b], [params, params])
    assert fed == [[(len(a), len(a)), (len(b), len(b))]]  # each prompt fed once, both in one step
    for ids, r in zip((a, b), results):
        assert len(r.prompt_logprobs) == len(ids) and r.completion_tokens == 1
    assert [p.logprob for p in results[0].prompt_logprobs[1:]] == pytest.approx(
        [p.logprob for p in tiny.prompt_logprobs(a)[1:]], abs=1e-5
    )


def test_spell():
    """Whole characters are text; a token that is part of a character is OpenAI's `bytes:` form."""
    assert spell("é".encode()) == "é" and spell(b"\xc3") == "bytes:\\xc3"
