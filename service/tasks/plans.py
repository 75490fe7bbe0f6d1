"""Tasks as plans: a task is a generator that yields the generations it needs (`Generate`) and is sent
their results back, so that the same plan runs on a calling thread (`run_plan`, behind `answer` and
`summarize`) and on the server's event loop (`service.engine.handle.TaskRun`), where the CPU work
between generations runs off the loop and no thread waits for the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

from service.engine.generator import TextGenerator
from service.engine.sampling_params import SamplingParams

Emit = Callable[[int, str], None]  # stream text of sequence i to the caller


@dataclass
class Generate:
    """One generation a plan asks for; it is sent back the results, one per prompt. `on_text(i, piece,
    emit)` sees each final piece of sequence i (True stops it) and may `emit` text to the caller."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    on_text: Callable[[int, str, Emit], bool | None] | None = None


def stream_every_piece(i: int, piece: str, emit: Emit) -> None:
    """An `on_text` that streams every piece."""
    emit(i, piece)


Plan = Generator[Generate, list, object]


def run_plan(gen: TextGenerator, plan: Plan, on_text=None, priority: int = 0):
    """Run a plan on this thread, each generation through `gen.generate`; returns the plan's value.
    `on_text(text)` receives what the plan streams."""
    emit = (lambda i, text: on_text(text)) if on_text else (lambda i, text: None)
    results = None
    while True:
        try:
            step = plan.send(results)
        except StopIteration as stop:
            return stop.value
        watch = (lambda i, piece, step=step: step.on_text(i, piece, emit)) if step.on_text else None
        results = gen.generate(step.prompts, step.params, watch, priority)
