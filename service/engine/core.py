"""The engine: one loop of steps over a scheduler, a model runner and the KV cache they share.

Each step is three calls, and only this module makes them:

    plan = scheduler.schedule()          # service.engine.scheduler: admissions, chunks, drafts, blocks
    output = runner.execute(plan, cache) # service.engine.runner: the model calls and the token picks
    scheduler.update(plan, output)       # tokens recorded, stop rules, finished sequences freed

After each turn (what arrived, then a step) what every sequence gained leaves as values
(`Scheduler.take_outputs`) for the output stage (`service.engine.output`), which hands them to the
sequences' consumers (detokenizing, stop strings, streaming, tasks' per-piece work) on a thread of its own
while the engine runs its thread, else right after the turn; a consumer that stops its sequence has it
ended at the next turn.

`Engine.run` runs sequences to their end through that loop: on the engine's own thread once `start` has
started it (the server, batch jobs: requests from many threads share the steps), else on the calling
thread (the command line, evals, tests), sizing the cache for what it runs. Requests hand their sequences
to `submit` (returns at once; each sequence's `on_finish`, on the output stage, says when it ends: the
async handle's way) and one-off model calls to `call`; `abort(request)` ends a request's sequences at
the next step. One thread owns every model call, so tensor-parallel collectives come in the same order on
every rank.

- Overload: more than `max_waiting` sequences queued -> `Overloaded` (HTTP 429 with Retry-After). A
  request of more sequences than `max_waiting` could never be admitted: `submit` refuses it with
  `TooLarge` (400), `run` admits it in parts.
- A request's own failure (a prompt the cache cannot take, its sampler, its consumer) ends that
  request's sequences with its error; the engine goes on.
- Engine failure: on the engine thread, an exception from a model call (a dead rank, a collective
  timeout, out of memory) is printed with its traceback, fails every queued and running sequence and
  every later request with `EngineFailed` (HTTP 503), and calls `on_fatal` once so that the server can
  answer what is in flight and exit non-zero. On the calling thread it is raised to the caller.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import torch
from torch import nn

from model.kv_cache import KVCache
from service.engine.blocks import BlockPool
from service.engine.memory import BLOCK_SIZE
from service.engine.metrics import STATE, Metrics
from service.engine.output import OutputStage
from service.engine.runner import ModelRunner
from service.engine.sampling_params import SamplingParams
from service.engine.scheduler import LOOKUP_ROWS, PROMPT_LOOKUP, Scheduler, SchedulerConfig
from service.engine.sequence import Completion, Sequence, SequenceOutput
from service.errors import EngineFailed, InvalidRequest, Overloaded, RequestFailed, TooLarge

OnToken = Callable[[int, int], bool]  # (sequence index, token id) -> True to stop that sequence
OnOutput = Callable[[int, SequenceOutput], int | None]  # (sequence index, its output) -> `Sequence.on_output`'s


class Engine:
    def __init__(
        self,
        model: nn.Module,
        stop_ids: frozenset[int] = frozenset(),
        max_batch: int = 8,
        context: int | None = None,
        prefill_chunk: int = 512,
        device: str | torch.device = "cpu",
        graphs: bool | None = None,
        compile: bool = False,
        overlap: bool = True,
        kv_memory: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
        prompt_lookup: int | None = None,
        lookup_rows: int = LOOKUP_ROWS,
        max_waiting: int = 64,
    ):
        """`max_batch`: the sequences a calling-thread run decodes at once (`start` sets the thread's);
        `overlap`: greedy graph steps are launched ahead of the host; `prompt_lookup`: draft tokens
        verified per step (by default off on the graph path, where verification would run eagerly beside
        captured decode steps: not measured). The others go to the `ModelRunner` and `SchedulerConfig`."""
        self.runner = runner = ModelRunner(model, context, device, graphs, compile, kv_memory, block_size)
        lookup = (0 if runner.use_graphs else PROMPT_LOOKUP) if prompt_lookup is None else prompt_lookup
        self.config = SchedulerConfig(
            runner.limits, stop_ids, prefill_chunk, prefix_caching, lookup, lookup_rows, runner.use_graphs and overlap
        )
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.scheduler: Scheduler | None = None  # over `cache`; made by `use` (or `run`, sized for its sequences)
        self.cache: KVCache | None = None
        self.metrics: Metrics | None = None  # whose queue time this engine observes (`start`)
        self.on_fatal: Callable[[], None] = lambda: None
        self.cv = threading.Condition()
        self.inbox: list[Sequence] = []
        self.calls: list[tuple[Callable[[], Any], Future]] = []  # queued
        self.taken: list[tuple[Callable[[], Any], Future]] = []  # taken off the queue by the step running them
        self.aborts: set[str] = set()
        self.stops: list[tuple[Sequence, BaseException | None]] = []  # sequences their consumers stopped
        self.outputs = OutputStage(self._stop)
        self.failure: str | None = None
        self.stopping = False
        self.thread: threading.Thread | None = None

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    @property
    def context(self) -> int:
        return self.runner.context

    @property
    def limits(self):
        return self.runner.limits

    def use(self, cache: KVCache, slots: int) -> None:
        """Run on `cache` with `slots` sequences at once, from an empty scheduler (no prefix cached)."""
        self.cache = cache
        pool = BlockPool(cache.num_blocks, cache.block_size, cache.region, slots)
        self.scheduler = Scheduler(self.config, pool, slots)

    def start(
        self,
        slots: int = 16,
        max_waiting: int | None = None,
        metrics: Metrics | None = None,
        on_fatal: Callable[[], None] | None = None,
    ) -> Engine:
        """Start the engine thread over a new cache for `slots` sequences (of the whole context each);
        `metrics` get the engine's state at each scrape (`Metrics.watch`) and its queue times; `on_fatal`
        runs once after an engine failure. One thread at a time: it owns every model call."""
        if self.running:
            raise RuntimeError("the engine thread runs already: stop it first")
        self.use(self.runner.new_cache(slots, self.context), slots)
        self.max_waiting = max_waiting or self.max_waiting
        self.on_fatal = on_fatal or self.on_fatal
        if metrics is not None and metrics is not self.metrics:
            self.metrics = metrics
            metrics.watch(self.state)
        self.stopping, self.failure = False, None
        self.outputs.start()
        self.thread = threading.Thread(target=self._loop, name="nlg-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the engine thread (what is queued gets `EngineFailed`) and the output stage's, once it has
        delivered what is left; later runs are on the calling thread (from an empty scheduler, after a
        failure)."""
        if self.thread is None:
            return
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(30)
        self.outputs.close()
        self.thread, self.stopping = None, False
        if self.failure:
            self.scheduler = self.cache = self.failure = None

    @property
    def running(self) -> bool:
        """Whether the engine thread runs the steps."""
        return self.thread is not None

    def sequences(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_output: OnOutput | None = None,
        request: str | None = None,
        priority: int = 0,
    ) -> list[Sequence]:
        """Checked sequences for `run` or `submit`, sequence i's outputs to `on_output(i, output)` (see
        `Sequence.on_output`): raises `InvalidRequest` for a prompt the model cannot take."""
        for p, sp in zip(prompts, params):
            self.limits.check_prompt(p, sp.max_tokens)
            self.limits.check_tokens([t for t, _ in sp.logit_bias], param="logit_bias")
        return [
            Sequence(list(p), sp, partial(on_output, i) if on_output else None, request, priority)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_token: OnToken | None = None,
        priority: int = 0,
    ) -> list[Completion]:
        """Run prompts to the end; `on_token(i, token)` sees each token of sequence i on the output stage
        (True: it stops there)."""

        def each(i: int, out: SequenceOutput) -> int | None:
            return next((k + 1 for k, t in enumerate(out.token_ids) if on_token(i, t)), None)

        return self.run(self.sequences(prompts, params, each if on_token else None, None, priority))

    def run(self, seqs: list[Sequence]) -> list[Completion]:
        """Run sequences to the end (on the engine thread when it runs, else on this one; more than
        `max_waiting` of them in parts); raises the first one's error."""
        if not self.running:
            self._fit(seqs)
        for start in range(0, len(seqs), self.max_waiting):
            part = seqs[start : start + self.max_waiting]
            self.submit(part)
            if self.running:
                for s in part:
                    s.done.wait()
            else:
                self._drive(part)
            for s in part:
                if s.error is not None:
                    raise s.error
        return [s.completion() for s in seqs]

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for the engine's next step; raises `TooLarge`, `Overloaded` or `EngineFailed` at
        once, before any of them is queued."""
        with self.cv:
            self._check()
            if len(seqs) > self.max_waiting:
                raise TooLarge(
                    f"the request needs {len(seqs)} sequences and this server queues at most {self.max_waiting} "
                    "(--max-waiting): send fewer prompts"
                )
            queued = len(self.inbox) + (len(self.scheduler.waiting) if self.scheduler else 0)
            if queued + len(seqs) > self.max_waiting:
                raise Overloaded(
                    f"{queued} sequences are already waiting (limit {self.max_waiting}); retry later",
                    retry_after=max(1, queued // self.scheduler.slots),
                )
            self.inbox += seqs
            self.cv.notify()

    def abort(self, request: str) -> None:
        """End the sequences of `request` (their `Sequence.request`) at the engine's next step, finish
        reason "cancelled"; from any thread, a no-op for a request that has ended."""
        with self.cv:
            self.aborts.add(request)
            self.cv.notify()

    def call(self, work: Callable[[], Any]) -> Future:
        """Run `work` on the engine thread between two steps (at once, on a calling-thread engine); the
        future gets its result. An `InvalidRequest` it raises is the caller's; any other exception fails
        the engine."""
        future: Future = Future()
        if not self.running:
            future.set_result(work())
            return future
        with self.cv:
            self._check()
            self.calls.append((work, future))
            self.cv.notify()
        return future

    def warm_up(self) -> list[tuple[int, int]]:
        """Capture the decode steps of the engine's cache ahead of the first request (`ModelRunner.warm_up`)."""
        return self.runner.warm_up(self.cache, self.scheduler.slots)

    def state(self) -> dict[str, float]:
        """The engine's state as `Metrics.watch` exports it (read from another thread: lengths only)."""
        b = self.scheduler
        if b is None:  # none made yet, or dropped after a failure on the calling thread
            return dict.fromkeys(STATE, 0)
        return {
            "vllm:num_requests_running": len(b.running),
            "vllm:num_requests_waiting": len(b.waiting) + len(self.inbox),
            "vllm:kv_cache_usage_perc": b.pool.used() / b.pool.capacity,
            "nlg_kv_cache_blocks_free": b.pool.available(),
            "vllm:num_preemptions": b.preemptions,
            "vllm:prefix_cache_queries": b.queried,
            "vllm:prefix_cache_hits": b.hits,
        }

    def step(self) -> None:
        """One step: plan, execute, update; then what the sequences gained (in this step and since the last)
        goes to the output stage."""
        plan = self.scheduler.schedule()
        if plan:
            self.scheduler.update(plan, self.runner.execute(plan, self.cache))
        self.outputs.put(self.scheduler.take_outputs())

    def _fit(self, seqs: list[Sequence]) -> None:
        """On the calling thread: keep the scheduler (prefix cache and all) while its cache is big enough
        for `seqs`, else make one that is."""
        slots = min(len(seqs), self.max_batch)
        length = max(s.length + s.params.max_tokens for s in seqs)
        blocks, region = self.runner.layout(slots, length)
        b, c = self.scheduler, self.cache
        if b is None or b.slots < slots or c.num_blocks < blocks or c.region < region:
            slots = max(slots, b.slots if b else 0)
            self.use(self.runner.new_cache(slots, length), slots)

    def _drive(self, seqs: list[Sequence]) -> None:
        """Turn the loop on this thread until `seqs` have ended; a model call's exception is raised here,
        and the scheduler is dropped (the next run starts from an empty one)."""
        try:
            while not all(s.done.is_set() for s in seqs):
                self._turn()
        except BaseException:
            self.scheduler = self.cache = None
            self.inbox, self.aborts, self.stops = [], set(), []
            raise

    def _turn(self) -> None:
        """Take what arrived (sequences, aborts, sequences their consumers stopped, calls) and run one step."""
        with self.cv:
            new, self.inbox = self.inbox, []
            self.taken, self.calls = self.calls, []
            aborts, self.aborts = self.aborts, set()
            stops, self.stops = self.stops, []
        for s in new:
            try:
                self.scheduler.add(s)
            except InvalidRequest as e:  # the request's input, not the engine's fault
                self.scheduler.finish(s, error=e)
            except Exception as e:
                failed = RequestFailed(f"the request could not be queued: {type(e).__name__}: {e}")
                self.scheduler.finish(s, error=failed)
        self.scheduler.abort(aborts)
        for s, error in stops:
            self.scheduler.finish(s, "stop", error)
        for work, future in self.taken:
            try:
                future.set_result(work())
            except InvalidRequest as e:
                future.set_exception(e)
        before = {id(s) for s in self.scheduler.waiting}
        self.step()
        if self.metrics is not None:
            now = time.monotonic()
            for s in self.scheduler.running:
                if id(s) in before:  # admitted this step
                    self.metrics.queue.observe(now - s.arrival)

    def _stop(self, s: Sequence, error: BaseException | None) -> None:
        """From the output stage: end `s` at the next turn (its consumer stopped it, or failed)."""
        with self.cv:
            self.stops.append((s, error))
            self.cv.notify()

    def _check(self) -> None:
        if self.failure:
            raise EngineFailed(self.failure)
        if self.stopping:
            raise EngineFailed("the engine is shutting down")

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (
                    self.inbox or self.calls or self.aborts or self.stops or self.scheduler.busy() or self.stopping
                ):
                    self.cv.wait()
                if self.stopping:  # whatever is left gets its answer: 503, the server is going down
                    self._end_all(EngineFailed("the engine is shutting down"))
                    return
            try:
                self._turn()
            except Exception as e:
                self._fail(e)
                return

    def _fail(self, error: Exception) -> None:
        self.failure = f"engine failed: {type(error).__name__}: {error}"
        print(f"nlg: error: {self.failure}", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()
        with self.cv:
            self._end_all(EngineFailed(self.failure))
        self.on_fatal()

    def _end_all(self, error: EngineFailed) -> None:
        """End every queued and running sequence and every pending call with `error` (their slots and
        blocks freed); the caller holds `cv`."""
        for s in self.inbox + self.scheduler.waiting + self.scheduler.running:
            self.scheduler.finish(s, error=error)
        self.scheduler.ahead = None
        self.outputs.put(self.scheduler.take_outputs())
        for _, future in self.taken + self.calls:
            if not future.done():
                future.set_exception(error)
        self.inbox, self.calls, self.taken = [], [], []
