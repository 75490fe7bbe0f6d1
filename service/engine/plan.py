"""What one engine step runs and what it gives back: the values that pass between the scheduler and the
model runner.

A step is `plan = scheduler.schedule()`, `output = runner.execute(plan, cache)`,
`scheduler.update(plan, output)` (`service.engine.core.EngineCore.step`). The scheduler decides which
sequences feed which tokens (a `StepPlan`); the runner makes the model calls and picks the tokens (a
`StepOutput`); the scheduler then records them, applies the stop rules and frees what finished. Neither
calls the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.engine.sequence import Sequence, TokenLogprob
from service.errors import RequestFailed


@dataclass(eq=False)
class Launched:
    """A greedy decode step on its way (the CUDA-graph path): the sequences it runs for, and every row's
    token, copied to the host once `ready` has passed (row i is slot i)."""

    seqs: list[Sequence]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None

    def result(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        rows = self.tokens.tolist()
        return [rows[s.slot] for s in self.seqs]


@dataclass
class StepPlan:
    """The work of one step. `prefill`: (sequence, tokens it feeds) prompt chunks, in slot order;
    `decode`: sequences that decode one token; `verify`: decoding sequences with a prompt-lookup draft,
    verified in one forward; `launch`: greedy decode rows launched ahead of the host, `chained` to the
    step launched before (whose tokens the host has not read); `collect`: a step launched before, whose
    tokens this step takes."""

    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    verify: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    launch: list[Sequence] = field(default_factory=list)
    chained: bool = False
    collect: Launched | None = None

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode or self.verify or self.launch or self.collect)


@dataclass(frozen=True)
class Picked:
    """The tokens one sequence takes this step, in order (a verified draft gives several), with their
    log-probabilities when the sequence asked for them; or the request's own failure (its sampler)."""

    seq: Sequence
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    error: RequestFailed | None = None


@dataclass(frozen=True)
class StepOutput:
    """What the runner gives back: each prefilled chunk's prompt log-probabilities (for sequences that
    asked), the tokens picked in the order they are to be recorded (collected, prefill, then decode or
    verify), and the step launched ahead, if any."""

    prompt_logprobs: tuple[tuple[Sequence, tuple[TokenLogprob | None, ...]], ...] = ()
    picked: tuple[Picked, ...] = ()
    launched: Launched | None = None
