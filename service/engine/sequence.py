"""What the engine runs and returns: one sequence's prompt, sampling parameters, callbacks and
progress (`Sequence`), its result (`Completion`) and per-token log-probabilities (`TokenLogprob`).

A sequence ends once, through `end`: finished (a finish reason) or failed (an error). `on_finish` then
runs on the thread that ended it (the engine's), which is how the async handle learns of it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.engine.sampling_params import SamplingParams


@dataclass
class TokenLogprob:
    """log p of the chosen token under the model (before any sampling processor), and the most likely
    alternatives as (token id, log p)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (end token, stop string, on_token said so), "length", "cancelled"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # with params.prompt_logprobs
    end_token: int | None = None  # the end-of-turn or stop token that ended it (not in token_ids)


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[int], bool] | None = None  # True: stop here
    request: str | None = None  # the request's id: `Engine.abort(request)` ends all its sequences
    priority: int = 0  # lower runs first (interactive 0, batch jobs 1)
    on_finish: Callable[[Sequence], None] | None = None  # called once when the sequence ends
    slot: int = -1  # the row it decodes in while it runs
    blocks: list[int] = field(default_factory=list)  # its block table in the paged KV cache
    keys: list[bytes] = field(default_factory=list)  # the prefix-cache keys of its first full blocks
    prefilled: int = 0  # tokens (of the prompt, then of the output) whose keys and values are in the cache
    admitted: int = 0  # when it last got a slot (a count): the youngest is preempted first
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # then the end token's, if one ended it
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # the first token's is None
    end_token: int | None = None  # the end-of-turn or stop token that ended it (not in `output`)
    finish_reason: str | None = None
    error: BaseException | None = None
    generator: torch.Generator | None = None  # a seeded request's own, made on the logits' device at its first draw
    arrival: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    def end(self, reason: str | None = None, error: BaseException | None = None) -> None:
        """Finish the sequence (`reason`, unless one is set already) or fail it (`error`); once."""
        if self.done.is_set():
            return
        self.finish_reason = self.finish_reason or reason
        self.error = error
        self.done.set()
        if self.on_finish is not None:
            self.on_finish(self)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self) -> list[int]:
        """The prompt and the output so far."""
        return self.prompt + self.output if self.output else self.prompt

    def completion(self) -> Completion:
        return Completion(
            self.prompt, self.output, self.finish_reason, self.logprobs, self.prompt_logprobs, self.end_token
        )
