"""Tool calls on chat, through the official `openai` client and raw HTTP: "required" and a named function
are constrained to valid calls (arguments valid against the function's parameters); "auto" reads calls out
of the reply; streamed calls come as `tool_calls` deltas and never leak into the content; a chat template
without tools is a 400; `--chat-template FILE` gives the model one that has."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from service.cli.parser import main
from service.engine.generator import TextGenerator
from service.server.app import build_app
from service.server.tools import OPEN, Held, parse

M = "tiny-random"
TEMPLATE = Path(__file__).parent.parent / "data" / "tools_template.jinja"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def url(serve):
    gen = TextGenerator.load(M, chat_template=TEMPLATE.read_text())
    with serve(build_app(gen, slots=4)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def valid(calls, names=SCHEMAS) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_are_valid_against_their_parameters(client):
    """tool_choice "required", greedy and sampled: the reply is only calls, each of a tool offered, with
    arguments valid against its parameters; finish reason tool_calls."""
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        r = client.chat.completions.create(
            model=M,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=300,
            temperature=temperature,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        valid(choice.message.tool_calls)


def test_a_named_function_and_one_call_only(client):
    """A named tool_choice calls that function; parallel_tool_calls false makes it exactly one call."""
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=M, messages=ASK, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, max_tokens=300
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    valid(calls)


def test_streamed_calls_come_as_deltas_never_as_content(client):
    """Streamed, a required call arrives as a `tool_calls` delta (index, id, name, arguments); no content
    delta holds any of the call's text."""
    stream = client.chat.completions.create(
        model=M, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, stream=True, temperature=0
    )
    content, calls, finish = "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls" and calls
    assert [c.index for c in calls] == list(range(len(calls)))
    valid(calls)


def test_history_with_calls_and_results_is_accepted(client, url):
    """A conversation that holds an assistant's tool calls (content null) and the tool's results goes back
    in; "auto" and "none" answer with text (the tiny model calls nothing of itself)."""
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=M, messages=history, tools=TOOLS, tool_choice=choice, max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length")
    bad = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": M, "messages": ASK + [{"role": "tool", "content": "x"}], "max_tokens": 4},
    )
    assert bad.status_code == 400 and "tool_call_id" in bad.text


@pytest.mark.parametrize(
    "body, words",
    [
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "same name"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "structured output"),
        ({"functions": [{"name": "f"}]}, "deprecated"),
    ],
)
def test_tool_requests_that_cannot_work_are_400(url, body, words):
    """Contradictory or unknown tool settings: 400 saying which."""
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": M, "messages": ASK, "max_tokens": 4} | body)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_a_template_without_tools_is_a_400_naming_them(tiny, serve, own_engine):
    """The tiny model's own template writes no tools: offering tools is `unsupported_parameter` on `tools`,
    and the message points at --chat-template."""
    with serve(build_app(own_engine(tiny))) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": M, "messages": ASK, "tools": TOOLS})
    error = r.json()["error"]
    assert r.status_code == 400 and (error["param"], error["code"]) == ("tools", "unsupported_parameter")
    assert "--chat-template" in error["message"]


def test_replies_are_read_into_content_and_calls():
    """`parse` takes every well-formed call out of the text; a call that is not JSON stays in the content."""
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    content, calls = parse(text + '\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    content, calls = parse("a <tool_call>not json</tool_call> b")
    assert calls == [] and content == "a <tool_call>not json</tool_call> b"
    assert parse('Checking. <tool_call>\n{"name": "get_ti') == ("Checking.", [])  # cut by max_tokens


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11])
def test_streamed_content_never_holds_a_call_whatever_the_pieces(size):
    """However the reply is cut into pieces, what `Held` lets out is the content before the call, and the
    end gives the rest and the calls; text that only looked like a call's start is let out."""
    text = 'Sure <tool thing. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    held = Held()
    out = "".join(held.take(text[i : i + size]) for i in range(0, len(text), size))
    rest, calls = held.rest()
    assert OPEN not in out + rest and (out + rest).strip() == "Sure <tool thing." and len(calls) == 1


def test_chat_template_option_reaches_the_tokenizer(capsys):
    """`--chat-template FILE` on the command line replaces the model's template (here seen in a chat
    prompt that now lists the tools the template was asked to write)."""
    main(["generate", "hi", "--model", M, "--chat", "--chat-template", str(TEMPLATE), "--max-tokens", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("stop", "length")


def test_litellm_gets_the_calls(url):
    """litellm's openai/ provider, as front-ends call tools through it: the calls come back parsed."""
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(
        model=f"openai/{M}",
        api_base=f"{url}/v1",
        api_key="unused",
        num_retries=0,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=300,
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
