"""Request models of the OpenAI-compatible endpoints.

They accept what OpenAI accepts (a prompt as text, texts, token ids or lists of token ids; chat content as
text or text parts; the developer role; `max_tokens` up to the context) and refuse the rest with 400 in
OpenAI's wording: an argument OpenAI does not define is "Unrecognized request argument supplied", and one
it defines that this server does not implement (tools, `suffix`, images) is "Unsupported parameter",
naming it. Nothing is ignored silently; `user` and `metadata` are accepted as what they are, labels for
the caller's own records.

Structured outputs: OpenAI's `response_format` (`json_object`, `json_schema`) on both endpoints, and
vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`) and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`; at most one per request (`Sampling.constraint`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from model.registry import DEFAULT_MODEL
from service.engine.sampling_params import REPETITION_PENALTY_RANGE
from service.errors import InvalidRequest
from service.server.schemas.base import SEED, Body, unsupported

MAX_CHOICES = 16
TOKEN_ID = r"^[0-9]{1,9}$"  # a logit_bias key: ASCII digits, no more than any vocabulary needs
# Parameters OpenAI defines that this server does not implement: refused when set to anything but a no-op.
UNSUPPORTED = {
    "functions": "the deprecated function calls: use tools",
    "function_call": "the deprecated function calls: use tool_choice",
    "audio": "audio output",
    "modalities": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning models",
    "suffix": "insertion (suffix)",
}
NO_OP = (None, False, [], "", {}, "none", "auto")


class OpenAIBody(Body):
    """Unknown arguments are refused, as OpenAI does; defined but unimplemented ones are refused by name."""

    model_config = ConfigDict(strict=True, extra="forbid")
    user: str | None = Field(None, description="an id for the end user, for the caller's records")
    metadata: dict[str, str] | None = Field(None, description="labels for the caller's records")

    @model_validator(mode="before")
    @classmethod
    def unsupported(cls, data: Any) -> Any:
        """Refuse an unimplemented parameter set to something; drop it when it asks for nothing
        (`tools: []`, `tool_choice: "none"`), as clients that always send it do."""
        if isinstance(data, dict):
            for name, what in UNSUPPORTED.items():
                if name in data and data[name] not in NO_OP:
                    raise unsupported(name, what)
            data = {k: v for k, v in data.items() if k not in UNSUPPORTED}
        return data


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64, description="the schema's name")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON schema")
    strict: bool | None = Field(None, description="the output always follows the schema here, strict or not")


class ResponseFormat(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def check(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is given with type json_schema, and only then")
        return self


class StructuredOutputs(Body):
    """vLLM's structured outputs: one of them."""

    model_config = ConfigDict(strict=True, extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (or its text)")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark grammar, or llama.cpp's GBNF")
    json_object: bool | None = None


class Sampling(OpenAIBody):
    """The sampling fields both endpoints share: OpenAI's, with OpenAI's defaults and ranges, plus vLLM's
    top_k and repetition_penalty."""

    model: str = Field(description="the served model's name (GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0: off")
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted once from a generated token")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per time a token was generated")
    logit_bias: dict[str, float] | None = Field(
        None,
        description="token id (as a string of ASCII digits) -> bias in [-100, 100]",
        json_schema_extra={"propertyNames": {"pattern": TOKEN_ID}},
    )
    seed: int | None = SEED
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings; never part of the output")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    ignore_eos: bool = Field(False, description="keep generating past end-of-turn tokens (benchmarks)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: a JSON schema (or its text)")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM's: one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's: a Lark grammar, or llama.cpp's GBNF")

    @field_validator("logit_bias")
    @classmethod
    def bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not re.fullmatch(TOKEN_ID, token):  # not str.isdigit: "²" is a digit int() refuses
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases are between -100 and 100, got {value} for token {token}")
        return bias

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise InvalidRequest("stop: at most 4 stop strings", param="stop")
        return tuple(stops)

    def biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(t), v) for t, v in (self.logit_bias or {}).items())

    def constraint(self) -> tuple[str, Any] | None:
        """The structured output asked for, as (kind, spec) for `service.engine.grammar`, or None; more
        than one is a 400."""
        asked = []
        f = self.response_format
        if f is not None and f.type == "json_object":
            asked.append(("response_format", "json_schema", {"type": "object"}))
        elif f is not None and f.type == "json_schema":
            asked.append(("response_format", "json_schema", f.json_schema.json_schema))
        s = self.structured_outputs
        forms = [
            ("guided_json", "json_schema", self.guided_json),
            ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice),
            ("guided_grammar", "grammar", self.guided_grammar),
        ]
        if s is not None:
            forms += [
                ("structured_outputs.json", "json_schema", s.json_),
                ("structured_outputs.regex", "regex", s.regex),
                ("structured_outputs.choice", "choice", s.choice),
                ("structured_outputs.grammar", "grammar", s.grammar),
                ("structured_outputs.json_object", "json_schema", {"type": "object"} if s.json_object else None),
            ]
        asked += [form for form in forms if form[2] is not None]
        if len(asked) > 1:
            names = ", ".join(name for name, _, _ in asked)
            raise InvalidRequest(f"one structured output per request, got {names}", param=asked[1][0])
        if not asked:
            return None
        name, kind, spec = asked[0]
        if kind == "json_schema" and isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise InvalidRequest(f"{name}: not JSON: {e}", param=name) from None
        return kind, spec


class CompletionRequest(Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": DEFAULT_MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
            ]
        }
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, token ids, or lists of token ids (one or more choices each)"
    )
    max_tokens: int = Field(16, ge=0, description="0 only with echo: score the prompt; at most the context")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, description="only equal to n: every sequence is returned")

    @model_validator(mode="after")
    def check(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens may be 0 only with echo")
        if isinstance(self.prompt, list) and (not self.prompt or any(p in ([], "") for p in self.prompt)):
            raise ValueError("prompt: an empty prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "best_of other than n (choosing among sequences)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(Body):
    type: Literal["text"]
    text: str


class CalledFunction(Body):
    name: str
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCall(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        description="text, or a list of text parts (null or left out only beside an assistant's tool calls)"
    )
    name: str | None = Field(None, description="the participant's name, passed to the chat template")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's tool calls, as a response gave them")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    @model_validator(mode="before")
    @classmethod
    def no_audio(cls, data: Any) -> Any:
        """A message echoed back from a response may carry OpenAI's empty fields (`refusal: null`,
        `tool_calls: []`...): they are dropped; a legacy function call or audio is refused by name."""
        if isinstance(data, dict):
            for name in ("tool_calls", "function_call", "audio", "refusal", "annotations"):
                if name in data and data[name] in NO_OP:
                    data = {k: v for k, v in data.items() if k != name}
                elif name in data and name not in ("refusal", "tool_calls"):
                    raise unsupported(f"messages.{name}", "legacy function calls and audio in messages")
            if data.get("role") == "assistant" and data.get("tool_calls") and "content" not in data:
                data = data | {"content": None}  # OpenAI's: content may be left out beside tool calls
        return data

    @model_validator(mode="after")
    def roles(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be left out only by an assistant's tool calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message has a tool_call_id, and only a tool message")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise unsupported("messages.content", f"{part['type']!r} content parts (only text)")
        return content

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: the developer role is the system role of older models;
        a tool call's arguments are an object (templates write them with `tojson`)."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": text} | ({"name": self.name} if self.name else {})
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _object(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _object(call: ToolCall) -> Any:
    """A tool call's arguments as an object; the text as it is when it is not JSON."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


class Function(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="calls always follow the schema when they are constrained")


class Tool(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: Function


class Named(Body):
    name: str


class NamedToolChoice(Body):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: Named


class ChatRequest(Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 64,
                }
            ]
        }
    )
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: what the context allows, up to 512")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token, with logprobs")
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools), none, required (at least one call) or one function"
    )
    parallel_tool_calls: bool = Field(True, description="whether a reply may hold several calls")

    @model_validator(mode="after")
    def check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: two functions have the same name")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice other than none or auto needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return self
