"""OpenAI's Responses API (stateless), through the official `openai` client: text in and out, the same text
chat gives for the same conversation, streamed as the API's typed events, a JSON schema through
`text.format`, `max_output_tokens` making it incomplete; what needs state or tools is refused by name."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

M = "tiny-random"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_a_response_is_what_chat_says_to_the_same_conversation(client):
    """`instructions` + `input` give the text chat gives for the system and user messages; usage and status."""
    r = client.responses.create(model=M, instructions="Be brief.", input="Say hi.", temperature=0, max_output_tokens=12)
    chat = client.chat.completions.create(
        model=M,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        temperature=0,
        max_tokens=12,
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")


def test_streamed_events_arrive_in_the_apis_order(client):
    """Streamed: created, in_progress, item and part added, deltas, then the done events and completed (or
    incomplete), numbered in order; the deltas join into the final text."""
    stream = client.responses.create(
        model=M, input="Once upon a time", temperature=0, max_output_tokens=16, stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text


def test_a_json_schema_through_text_format(client):
    """`text.format` json_schema constrains the output: it parses and validates."""
    r = client.responses.create(
        model=M,
        input=[{"role": "user", "content": "The weather as JSON."}],
        text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}},
        max_output_tokens=200,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.output_text), SCHEMA)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"background": True}, "background"),
        ({"input": []}, "empty list"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "nope"),
    ],
)
def test_what_needs_state_or_tools_is_a_400(url, body, words):
    """Stateless: a previous response, tools, background runs are 400s naming the field; a bad schema and an
    empty input too (the fuzzer found the latter a 500: the chat template refused an empty conversation)."""
    r = httpx.post(f"{url}/v1/responses", json={"model": M, "input": "hi"} | body)
    assert r.status_code == 400 and words in r.text, r.text


def test_an_overlong_format_name_is_a_400(url):
    """The format's name is bounded as chat's is (64 characters): past it, a 400 (it was a 500)."""
    fmt = {"type": "json_schema", "name": "x" * 70, "schema": {}}
    r = httpx.post(f"{url}/v1/responses", json={"model": M, "input": "hi", "text": {"format": fmt}})
    assert r.status_code == 400 and "name" in r.text
