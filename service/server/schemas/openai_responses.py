"""Response models of the OpenAI-compatible endpoints, for the OpenAPI document (the handlers build these
shapes as dicts; the tests check real responses against these models and the `openai` package's types)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="each token's text; `bytes:\\xNN` for part of a character")
    token_logprobs: list[float | None] = Field(description="None for a prompt's first token")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="where each token starts, in characters of the text")


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt index x n + choice")
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "cancelled"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object's text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null only beside tool calls")
    tool_calls: list[ToolCall] | None = Field(None, description="with tools offered: the calls the reply holds")


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int = Field(description="the context: prompt plus completion tokens")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]
