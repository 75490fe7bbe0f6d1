"""What the engine runs and returns: one sequence's prompt, sampling parameters, consumer and progress
(`Sequence`), what it gained in one step (`SequenceOutput`), its result (`Completion`) and per-token
log-probabilities (`TokenLogprob`).

Two sides write a sequence. The engine's loop (scheduler and runner) owns its slot, blocks, output and
`finished`, set when the scheduler ends it. The output stage (`service.engine.output`) hands each step's
`SequenceOutput` to `on_output` after the step, records how many tokens the consumer kept when it stopped
the sequence itself (`kept`), and ends the sequence once, through `end`, after its last output: `done` is
set and `on_finish` runs on the output stage's thread, which is how the async handle learns of it. The
result (`completion`) is read after `done`, when the engine no longer changes the sequence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    finish_reason: str  # "stop" (end token, stop string, its consumer said so), "length", "cancelled"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # with params.prompt_logprobs
    end_token: int | None = None  # the end-of-turn or stop token that ended it (not in token_ids)


class SequenceOutput(NamedTuple):
    """What one sequence gained in one step, copied on the engine's thread: the tokens added to its output,
    their log-probabilities (when asked for; an end token's last), the prompt's log-probabilities (when
    asked for, once, with its first tokens or its end), the prompt tokens in the cache after a prefill
    chunk (`prefilled`), and whether it ended (`finished`, with the `error` that failed it, if one did)."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    prefilled: int | None = None
    finished: bool = False
    error: BaseException | None = None


OnOutput = Callable[[SequenceOutput], int | None]  # None: go on; n: the sequence stops after n of these tokens


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    on_output: OnOutput | None = None  # the consumer: sees each step's output after the step
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
    finished: bool = False  # the scheduler ended it: no step changes it again
    scored: bool = False  # its prompt's log-probabilities went out with an output
    delivered: int = 0  # output stage: tokens handed to `on_output`
    kept: int | None = None  # output stage: the tokens its consumer took before stopping it, if it did
    error: BaseException | None = None
    generator: torch.Generator | None = None  # a seeded request's own, made on the logits' device at its first draw
    matcher: Any = None  # with `params.grammar`: its llguidance matcher, which the sampler advances
    arrival: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    def end(self, error: BaseException | None = None) -> None:
        """Finish the sequence or fail it (`error`), once, after its last output: finish reason "stop" when
        its consumer stopped it, else the scheduler's."""
        if self.done.is_set():
            return
        if self.kept is not None:
            self.finish_reason, self.end_token = "stop", None
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
        """The result (after `done`): the output up to where its consumer stopped it, if it did."""
        n = self.kept
        output, logprobs = (self.output, self.logprobs) if n is None else (self.output[:n], self.logprobs[:n])
        return Completion(self.prompt, output, self.finish_reason, logprobs, self.prompt_logprobs, self.end_token)
