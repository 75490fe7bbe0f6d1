"""The HTTP side's handle on the engine thread (vLLM's AsyncLLM pattern): no thread is parked per request.

`AsyncEngine.start` checks and submits one generate call's sequences at once, so that a request that
cannot run (`InvalidRequest`, `TooLarge`, `Overloaded`, `EngineFailed`) gets its HTTP status before
any byte of a response; it returns a `Running`. The engine's output stage (`service.engine.output`)
pushes that request's events (text pieces, then its results or its error) into the request's
`asyncio.Queue` with `loop.call_soon_threadsafe`; handlers await them. Each event is a value (a `Piece`
carries copies of the token ids and log-probabilities it added): no handler reads a `Sequence`.
`AsyncEngine.abort(request_id)` ends a request's sequences at the engine's next step (a client that left,
a deadline passed); `Running` and `TaskRun` do it on any way out before their end.

`TaskRun` drives a task's plan (`service.tasks.plans`): the CPU work between generations (tokenizing, chat
templates, splitting) runs on a worker thread, never on the event loop; each generation is awaited
here, split into parts of at most `--max-waiting` sequences so that no task can outgrow the queue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple

from service.engine.generator import Generation, OnText, TextGenerator, TextResult
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence, TokenLogprob
from service.errors import ClientGone, DeadlineExceeded
from service.tasks.plans import Plan

POLL_S = 0.25  # how often a plain (non-streaming) request checks that its client is still there


class Running:
    """One submitted generate call: its text pieces `(i, piece)` as they come, then its results."""

    def __init__(self, handle: AsyncEngine, request_id: str, deadline: float | None):
        self.handle, self.request_id, self.deadline = handle, request_id, deadline
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.generation: Generation | None = None
        self._left = 0
        self.result: list[TextResult] | None = None
        self.stage: tuple[str, int, int] | None = None  # (stage, sequences done before this call, in all)

    def put(self, item: tuple[str, Any]) -> None:
        """From any thread: queue an event for the consumer (dropped once the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    def _ended(self, seq: Sequence) -> None:
        """On the output stage, as each sequence ends: its progress when a stage is watched, then after the
        last the results (or the error)."""
        self._left -= 1
        if self.stage is not None:
            stage, before, total = self.stage
            self.put(("progress", Progress(stage, before + len(self.generation.seqs) - self._left, total)))
        if self._left:
            return
        seqs = self.generation.seqs
        error = next((s.error for s in seqs if s.error is not None), None)
        if error is None:
            try:
                self.put(("done", self.generation.results([s.completion() for s in seqs])))
                return
            except Exception as e:  # the request's own streaming callback
                error = e
        self.put(("error", error))

    async def _next(self, timeout: float | None) -> tuple[str, Any] | None:
        """The next event, or None after `timeout` seconds; raises `DeadlineExceeded` past the deadline."""
        if self.deadline is not None:
            left = self.deadline - self.loop.time()
            if left <= 0:
                raise DeadlineExceeded("the request took longer than its deadline (--request-timeout)")
            timeout = left if timeout is None else min(timeout, left)
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def pieces(self) -> AsyncIterator[Piece | Progress]:
        """The text pieces as they come (and the progress of a watched stage); ends after the last (then
        `result` is set). Raises the request's error or `DeadlineExceeded`; aborts the sequences on any
        way out before the end."""
        try:
            while True:
                event = await self._next(None)
                if event is None:
                    continue
                kind, value = event
                if kind in ("piece", "progress"):
                    yield value
                elif kind == "error":
                    raise value
                else:
                    self.result, self.finished = value, True
                    return
        finally:
            if not self.finished:
                self.handle.abort(self.request_id)

    async def wait(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> list[TextResult]:
        """The results, checking every `POLL_S` that the client is still there (whatever events come in
        between); aborts if it is not."""
        check_at = self.loop.time() + POLL_S
        try:
            while True:
                event = await self._next(max(0.0, check_at - self.loop.time()))
                if self.loop.time() >= check_at:
                    if disconnected is not None and await disconnected():
                        raise ClientGone("the client went away")
                    check_at = self.loop.time() + POLL_S
                if event is None:
                    continue
                kind, value = event
                if kind == "error":
                    raise value
                if kind == "done":
                    self.finished = True
                    return value
        finally:
            if not self.finished:
                self.handle.abort(self.request_id)


class Progress(NamedTuple):
    """A watched stage's progress: `done` of its `total` sequences have ended."""

    stage: str
    done: int
    total: int


class Piece(NamedTuple):
    """Text sequence `index` streamed, with the token ids it added since that sequence's last piece, their
    log-probabilities (when asked for) and, with its first piece, the prompt's (when asked for)."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


class AsyncEngine:
    def __init__(self, gen: TextGenerator, timeout: float | None = None):
        """Requests to `gen`'s engine, whose thread runs (`Engine.start`)."""
        self.gen, self.engine, self.timeout = gen, gen.engine, timeout

    def deadline(self) -> float | None:
        return None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout

    def start(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_text: OnText | None = None,
        priority: int = 0,
        deadline: float | None = None,
        request_id: str | None = None,
        stream: bool = True,
        stage: tuple[str, int, int] | None = None,
        prompt_progress: bool = False,
    ) -> Running:
        """Submit one generate call now, as part of `request_id` (a new id when None). `on_text(i, piece)`
        sees each final piece (True stops sequence i there), on the engine's output stage; with `stream`,
        each piece it does not stop at goes to the consumer of `pieces`, else none does (a call whose
        results are awaited with `wait`: no event per token). With `stage` (name, sequences of the stage done
        before this call, in all), a `Progress` event follows each sequence's end; with `prompt_progress`, a
        prompt prefilled over several steps reports its tokens in the cache after each ("prompt")."""
        request_id = request_id or uuid.uuid4().hex
        running = Running(self, request_id, deadline if deadline is not None else self.deadline())
        running.stage = stage
        sent = [0] * len(prompts)  # each sequence's tokens already in a piece
        scored = [False] * len(prompts)  # whether its prompt's log-probabilities went with one

        def emit(i: int, text: str) -> bool | None:
            """`on_text`, then the piece, with copies of the tokens and log-probabilities sequence i added
            since its last."""
            if on_text is not None and on_text(i, text):
                return True
            g, start = running.generation, sent[i]
            end = sent[i] = len(g.token_ids[i])
            tokens, lps = tuple(g.token_ids[i][start:end]), tuple(g.logprobs[i][start:end])
            prompt = () if scored[i] else g.prompt_logprobs[i]
            scored[i] = True
            running.put(("piece", Piece(i, text, tokens, lps, prompt)))
            return None

        watch = emit if stream else on_text
        g = running.generation = Generation(self.gen, prompts, params, watch, request_id, priority)
        if prompt_progress:
            g.on_prefill = partial(_prompt_progress, running, [len(p) for p in prompts], set())
        running._left = len(g.seqs)
        for s in g.seqs:
            s.on_finish = running._ended
        self.engine.submit(g.seqs)
        return running

    def abort(self, request_id: str) -> None:
        """End every sequence of the request at the engine's next step (a no-op once it has ended)."""
        self.engine.abort(request_id)

    async def call(self, work: Callable[[], Any]) -> Any:
        """Run a model call (`work`) on the engine thread and await its result."""
        return await asyncio.wrap_future(self.engine.call(work))

    @property
    def limit(self) -> int:
        """The most sequences one submitted call may have."""
        return self.engine.max_waiting


def _prompt_progress(running: Running, totals: list[int], started: set[int], i: int, done: int) -> None:
    """Sequence i's prompt progress, from its first chunk that leaves some of it to prefill (a prompt that
    fits one step reports nothing)."""
    if done < totals[i] or i in started:
        started.add(i)
        running.put(("progress", Progress("prompt", done, totals[i])))


async def advance(plan: Plan, results: list[TextResult] | None) -> tuple[Any, Any]:
    """Run the plan's CPU work up to its next generation, on a worker thread: (step, None), or (None,
    the plan's return value) at its end."""

    def send():
        try:
            return plan.send(results), None
        except StopIteration as stop:
            return None, stop.value

    return await asyncio.to_thread(send)


class TaskRun:
    """A task's plan on the event loop. `await begin()` runs it to its first generation and submits that
    (raising the request's HTTP error before any response starts); then `pieces()` streams what the plan
    emits, or `wait()` awaits the plan's return value."""

    def __init__(self, handle: AsyncEngine, plan: Plan, priority: int = 0, stream: bool = True):
        self.handle, self.plan, self.priority, self.stream = handle, plan, priority, stream
        self.request_id = uuid.uuid4().hex  # every part of every generation of the plan
        self.deadline = handle.deadline()
        self.running: Running | None = None
        self.value: Any = None
        self._part: tuple[Any, int, list[TextResult]] | None = None

    async def begin(self) -> None:
        step, self.value = await advance(self.plan, None)
        if step is not None:
            self._submit(step, 0, [])

    def _submit(self, step, start: int, done: list[TextResult]) -> None:
        n = self.handle.limit
        prompts, params = step.prompts[start : start + n], step.params[start : start + n]
        stage = (step.stage, start, len(step.prompts)) if step.stage and self.stream else None
        self.running = self.handle.start(
            prompts,
            params,
            step.on_text,
            self.priority,
            self.deadline,
            self.request_id,
            self.stream and step.stream,
            stage,
            prompt_progress=self.stream and len(prompts) == 1,
        )
        self._part = (step, start + len(prompts), done)

    async def _after(self, results: list[TextResult]) -> bool:
        """Record a finished part; submit the next part or the next step. False once the plan is done."""
        step, end, done = self._part
        done = done + results
        if end < len(step.prompts):
            self._submit(step, end, done)
            return True
        step, self.value = await advance(self.plan, done)
        if step is None:
            self.running = None
            return False
        self._submit(step, 0, [])
        return True

    async def pieces(self) -> AsyncIterator[str | Progress]:
        """The pieces the plan streams, and the progress of its staged generations; the plan's return value
        is in `value` after the last."""
        try:
            while self.running is not None:
                async for piece in self.running.pieces():
                    yield piece if isinstance(piece, Progress) else piece.text
                if not await self._after(self.running.result):
                    return
        finally:
            self.abort()

    async def wait(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> Any:
        try:
            while self.running is not None:
                if not await self._after(await self.running.wait(disconnected)):
                    break
            return self.value
        finally:
            self.abort()

    def abort(self) -> None:
        if self.running is not None:
            self.handle.abort(self.request_id)
