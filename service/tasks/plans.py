"""Tasks as plans: a task is a generator that yields the generations it needs (`Generate`) and is sent
their results back, so that the same plan runs on a calling thread (`run_plan`, behind `answer` and
`summarize`) and on the server's event loop (`service.engine.handle.TaskRun`), where the CPU work
between generations runs off the loop and no thread waits for the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

from service.engine.generator import OnText, TextGenerator
from service.engine.sampling_params import SamplingParams


@dataclass
class Generate:
    """One generation a plan asks for; it is sent back the results, one per prompt. `on_text(i, piece)`
    sees each final piece of sequence i (True stops it there); with `stream`, the pieces it does not stop
    at are streamed to the caller (on the server). A `stage` ("map", "windows") names a generation of many
    sequences whose progress is reported as each one ends."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    stream: bool = False
    on_text: OnText | None = None
    stage: str | None = None


Plan = Generator[Generate, list, object]
Progress = Callable[[str, int, int], None]  # (stage, sequences done, sequences in the generation)


def run_plan(gen: TextGenerator, plan: Plan, priority: int = 0, progress: Progress | None = None):
    """Run a plan on this thread, each generation through `gen.generate`; returns the plan's value.
    `progress(stage, done, total)` hears of each sequence ending in a generation that has a stage."""
    results = None
    while True:
        try:
            step = plan.send(results)
        except StopIteration as stop:
            return stop.value
        ended = _counted(progress, step.stage, len(step.prompts)) if progress and step.stage else None
        results = gen.generate(step.prompts, step.params, step.on_text, priority, ended)


def _counted(progress: Progress, stage: str, total: int) -> Callable[[int], None]:
    """An `on_end` that reports each sequence's end to `progress` as a count."""
    done = iter(range(1, total + 1))
    return lambda _i: progress(stage, next(done), total)
