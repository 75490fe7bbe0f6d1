"""Sampling parameters (`SamplingParams`): what a request asks of the token pick. Greedy when temperature
is 0 (the default), so the same input gives the same output; a temperature below `MIN_TEMPERATURE` is
greedy too (dividing by it would overflow the logits, as vLLM also treats it). Every value accepted keeps
the probabilities defined: repetition penalties are bounded and top-p always keeps the most likely
token. `service.engine.sampler` applies them; a `grammar` (structured outputs) through the sequence's
matcher (`service.engine.grammar`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import InvalidRequest

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # logits are scaled by at most 100x: finite in fp16 and up
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes (as int64)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    no_repeat_ngram: int = 0  # >0: never repeat an n-gram of generated tokens (0: off)
    ignore_eos: bool = False  # keep going past end-of-turn tokens (benchmarks)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (from the prefill's own forward)
    grammar: str | None = None  # llguidance's grammar the output must match (`service.engine.grammar`)

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequest(f"{name} must be a finite number, got {getattr(self, name)}", param=name)
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise InvalidRequest(f"max_tokens must be at least 1 (0 only to score the prompt), got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise InvalidRequest(
                f"repetition_penalty must be between {low:g} and {high:g}, got {self.repetition_penalty}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise InvalidRequest(f"{name} must be between 0 and 20, got {value}", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(f"{name} must be between -2 and 2, got {getattr(self, name)}", param=name)
        if any(not (math.isfinite(v) and -100 <= v <= 100) for _, v in self.logit_bias):
            raise InvalidRequest("logit_bias values must be between -100 and 100", param="logit_bias")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequest(f"seed must be a 64-bit integer, got {self.seed}", param="seed")
        if self.no_repeat_ngram < 0:
            raise InvalidRequest(f"no_repeat_ngram must be >= 0, got {self.no_repeat_ngram}")

    @property
    def counts_tokens(self) -> bool:
        """Whether a penalty depends on the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """Plain argmax: no processor changes the logits."""
        return (
            self.temperature < MIN_TEMPERATURE
            and not self.counts_tokens
            and self.no_repeat_ngram == 0
            and not self.logit_bias
            and self.grammar is None
        )
