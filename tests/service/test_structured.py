"""Structured outputs (llguidance): every form OpenAI's and vLLM's clients send, plain and streamed, alone
and under concurrency; what comes back always matches (parses and validates with `jsonschema` for a schema);
a schema or grammar that cannot be used is a 400 naming what is wrong; a grammar's dead end fails its own
request alone."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from service.engine.sampler import Sampler
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence
from service.errors import InvalidRequest, RequestFailed
from service.server.app import build_app

M = "tiny-random"
CHAT = {"model": M, "messages": [{"role": "user", "content": "Describe a city as JSON."}], "max_tokens": 200}
# Bounded everywhere, so that even the tiny random model's output ends inside max_tokens.
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["port", "capital", "village"]},
        "tags": {"type": "array", "items": {"enum": ["old", "new", "big"]}, "maxItems": 3},
        "coast": {"type": "boolean"},
    },
    "required": ["name", "rank", "kind", "tags", "coast"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def url(tiny, serve, own_engine):
    with serve(build_app(own_engine(tiny), slots=4)) as url:
        yield url


def content(url: str, body: dict) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT | body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_a_json_schema_through_the_openai_client_always_validates(url):
    """OpenAI's `response_format` json_schema, greedy and sampled with several seeds: every output parses
    and validates against the schema."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2), (1.3, 3)):
        r = client.chat.completions.create(
            model=M, messages=CHAT["messages"], max_tokens=200, response_format=fmt, temperature=temperature, seed=seed
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), CITY)


class City(BaseModel):
    name: str = Field(max_length=12)
    rank: int = Field(ge=0, le=99)
    kind: Literal["port", "capital", "village"]
    coast: bool


def test_the_openai_clients_parse_with_a_pydantic_model(url):
    """`client.chat.completions.parse(response_format=Model)`: the client sends the model's strict schema
    and parses the reply into the model."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.parse(model=M, messages=CHAT["messages"], max_tokens=200, response_format=City)
    assert isinstance(r.choices[0].message.parsed, City)


def test_every_vllm_form_and_completions(url):
    """vLLM's `guided_*` fields and `structured_outputs`, on chat and on completions: the output matches."""
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", content(url, {"guided_regex": "[0-9]{3}-[a-z]{2}"}))
    assert content(url, {"guided_choice": ["red", "green", "blue sky"]}) in ("red", "green", "blue sky")
    assert content(url, {"structured_outputs": {"choice": ["yes", "no"]}}) in ("yes", "no")
    assert content(url, {"guided_grammar": 'start: "a" | "b" "c"'}) in ("a", "bc")
    assert content(url, {"guided_grammar": 'root ::= "yes" | "no"'}) in ("yes", "no")  # llama.cpp's GBNF
    jsonschema.validate(json.loads(content(url, {"guided_json": json.dumps(CITY)})), CITY)
    jsonschema.validate(json.loads(content(url, {"structured_outputs": {"json": CITY}})), CITY)
    r = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": M,
            "prompt": "A city:",
            "max_tokens": 200,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
            "n": 2,
            "temperature": 1.0,
            "seed": 5,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        jsonschema.validate(json.loads(choice["text"]), CITY)


def test_streamed_pieces_join_into_valid_json(url):
    """Streamed, the deltas join into the same valid JSON the plain request returns."""
    body = CHAT | {
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
        "temperature": 0,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(json.loads(x)["choices"][0]["delta"].get("content") or "" for x in lines[:-1])
    assert text == content(url, {"response_format": body["response_format"], "temperature": 0})
    jsonschema.validate(json.loads(text), CITY)


def test_the_empty_schema_and_json_object_never_loop_on_whitespace(url):
    """`{}` (any JSON) and `json_object` (any object), the forms that loop other servers on whitespace: the
    output holds no run of whitespace between tokens, and what ends within max_tokens parses."""
    for fmt in ({"type": "json_schema", "json_schema": {"name": "any", "schema": {}}}, {"type": "json_object"}):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"response_format": fmt}, timeout=60).json()
        text = r["choices"][0]["message"]["content"]
        assert not re.search(r"\s\s", text) and text.strip() == text
        if r["choices"][0]["finish_reason"] == "stop":
            value = json.loads(text)
            assert fmt["type"] != "json_object" or isinstance(value, dict)


def test_constrained_and_free_requests_together(url, tiny):
    """Eight requests at once, half constrained by different schemas, half free: each constrained output
    validates, and each free one is what it is alone."""
    grid = {"type": "integer", "minimum": 0, "maximum": 9}
    nested = {"type": "array", "items": {"type": "array", "items": grid, "maxItems": 3}, "minItems": 1, "maxItems": 3}
    schemas = [CITY, nested]
    alone = content(url, {"max_tokens": 16, "temperature": 0})

    def one(i):
        if i % 2:
            return None, content(url, {"max_tokens": 16, "temperature": 0})
        schema = schemas[i // 2 % 2]
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        return schema, content(url, {"response_format": fmt, "temperature": 0.9, "seed": i})

    with ThreadPoolExecutor(8) as pool:
        for schema, text in pool.map(one, range(8)):
            if schema is None:
                assert text == alone
            else:
                jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "body, words",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "nope",
        ),
        ({"guided_regex": "[a-"}, "regex"),
        ({"guided_json": "{not json"}, "not JSON"),
        ({"guided_grammar": "start: undefined_rule"}, "undefined_rule"),
        ({"guided_choice": []}, "choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one structured output"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"response_format": {"type": "yaml"}}, "type"),
    ],
)
def test_what_cannot_be_used_is_a_400_naming_it(url, body, words):
    """A schema, regex or grammar llguidance cannot take, a malformed form, or two at once: 400, saying why."""
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT | body, timeout=60)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_a_grammar_dead_end_fails_that_request_alone(tiny):
    """A matcher that cannot go on (here: put in its error state by a token its grammar refuses) fails its
    own row with `RequestFailed`; the free row beside it gets its token."""
    grammar = tiny.grammars.compile("choice", ["ab"])
    stuck = Sequence([1, 2], SamplingParams(grammar=grammar), slot=0)
    stuck.matcher = tiny.grammars.matcher(grammar)
    assert not stuck.matcher.consume_tokens(tiny.tokenizer.encode("x"))
    free = Sequence([1, 2], SamplingParams(temperature=1.0, seed=0), slot=1)
    logits = torch.randn(2, tiny.engine.limits.vocab_size, generator=torch.Generator().manual_seed(0))
    failed, token = Sampler().pick([stuck, free], logits)
    assert isinstance(failed, RequestFailed) and "grammar" in str(failed) and isinstance(token, int)


def test_the_cache_keeps_checked_grammars(tiny):
    """A grammar is checked once and kept; a new sequence copies the kept matcher."""
    first = tiny.grammars.compile("json_schema", CITY)
    assert tiny.grammars.compile("json_schema", CITY) == first and first in tiny.grammars.kept
    a, b = tiny.grammars.matcher(first), tiny.grammars.matcher(first)
    assert a.consume_tokens(tiny.tokenizer.encode("{")) and not b.is_error() and a is not b
    with pytest.raises(InvalidRequest, match="objectx"):
        tiny.grammars.compile("json_schema", {"type": "objectx"})


def test_prompt_lookup_drafts_are_checked_against_the_grammar(tiny):
    """Greedy constrained output with prompt-lookup speculation: drafts are cut where the grammar refuses
    them and verified under its mask, so the output is the one plain decoding gives, in fewer steps."""
    from service.engine.core import Engine

    grammar = tiny.grammars.compile("regex", "[0-9]{30}(ab|cd)")
    ids = tiny.tokenizer.encode("1212121212 numbers: ")
    outputs = []
    for lookup in (0, 5):
        engine = Engine(tiny.engine.model, tiny.tokenizer.stop_ids, prompt_lookup=lookup)
        seq = engine.sequences([ids], [SamplingParams(max_tokens=40, grammar=grammar)])[0]
        seq.matcher = tiny.grammars.matcher(grammar)
        outputs.append(engine.run([seq])[0].token_ids)
        drafted, accepted = engine.scheduler.drafted, engine.scheduler.accepted
    assert outputs[0] == outputs[1] and re.fullmatch("[0-9]{30}(ab|cd)", tiny.tokenizer.decode(outputs[1]))
    assert accepted > 0 and drafted > 0


@pytest.mark.slow
def test_the_default_model_fills_a_schema_from_a_passage():
    """SmolLM2-135M-Instruct, greedy, asked to extract fields from a passage under a schema, `{}` and
    `json_object`: each reply ends by itself (finish reason stop) and parses; the schema's validates."""
    from service.engine.generator import TextGenerator

    smol = TextGenerator.load("smollm2-135m-instruct")
    schema = {
        "type": "object",
        "properties": {"person": {"type": "string"}, "year": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["person", "year", "city"],
        "additionalProperties": False,
    }
    passage = "In 1889 Gustave Eiffel finished his tower in Paris for the World's Fair."
    ids = smol.tokenizer.chat([{"role": "user", "content": f"{passage}\nGive the person, year and city as JSON."}])
    for kind, spec in (("json_schema", schema), ("json_schema", {}), ("json_schema", {"type": "object"})):
        grammar = smol.grammars.compile(kind, spec)
        r = smol.generate([ids], [SamplingParams(max_tokens=120, grammar=grammar)])[0]
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), spec)


def test_a_grammar_that_compiles_too_long_is_a_400_not_a_wait(url, monkeypatch):
    """The request waits at most COMPILE_S for its grammar (here a compile made to take 2 s against 0.2)."""
    import time

    from service.engine.grammar import Grammars
    from service.server.routes import openai as routes

    real = Grammars.compile
    monkeypatch.setattr(routes, "COMPILE_S", 0.2)
    monkeypatch.setattr(Grammars, "compile", lambda self, *a: time.sleep(2) or real(self, *a))
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"guided_regex": "[0-9]+"}, timeout=60)
    assert r.status_code == 400 and "to compile" in r.json()["error"]["message"]
