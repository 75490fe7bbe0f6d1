"""Request models of the OpenAI-compatible endpoints (responses are plain dicts in OpenAI's shape).

Parameters OpenAI defines that we do not implement are refused with 400 when set to a non-default
value, never silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from service.engine.sampling import REPETITION_PENALTY_RANGE
from service.errors import InvalidRequest
from service.server.schemas.base import MAX_TOKENS, SEED, Body


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The sampling fields both endpoints share (OpenAI's defaults, plus vLLM's top_k and
    repetition_penalty)."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    seed: int | None = SEED
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings; never part of the output")
    n: int = Field(1, ge=1, le=1, description="only 1")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    ignore_eos: bool = Field(False, description="keep generating past end-of-turn tokens (benchmarks)")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise InvalidRequest("stop: at most 4 stop strings", param="stop")
        return tuple(stops)


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] = Field(description="text, token ids, or a list of texts (one choice each)")
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def check(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens may be 0 only with echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty")
        return self


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="default: what the context allows")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
