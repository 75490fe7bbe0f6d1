"""The engine's output stage: each step's `SequenceOutput` values reach their sequences' consumers after
the step, outside the engine's loop (vLLM's output processor).

A consumer (`Sequence.on_output`: the text side detokenizes, finds stop strings, streams pieces, runs a
task's per-piece work, observes token latencies) sees the tokens a step added. With the engine thread
running, a thread of this stage's own takes each turn's outputs from a queue, so that none of that work
holds up the next step; on a calling-thread engine it runs right after each turn. A consumer that stops
its sequence (a stop string, a task's `on_text`) says after how many of the output's tokens: the engine
ends the sequence at its next turn, and what it made meanwhile is dropped from the result
(`Sequence.kept`). A consumer that raises fails its own sequence alone. A sequence's last output ends it
(`Sequence.end`), after all the tokens before it were delivered.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable

from service.engine.sequence import Sequence, SequenceOutput
from service.errors import RequestFailed

Stop = Callable[[Sequence, BaseException | None], None]  # end a sequence at the engine's next turn


class OutputStage:
    def __init__(self, stop: Stop):
        """`stop(s, error)` asks the engine to end `s` (failed with `error`, if not None)."""
        self.stop = stop
        self.queue: queue.SimpleQueue | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Deliver on a thread of its own from now on."""
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, args=(self.queue,), name="nlg-output", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Deliver what is queued, stop the thread; later outputs are delivered on the calling thread."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join(30)
        self.thread = self.queue = None

    def put(self, outputs: list[tuple[Sequence, SequenceOutput]]) -> None:
        """A turn's outputs: queued for the stage's thread when it runs, else delivered now."""
        if not outputs:
            return
        if self.thread is not None:
            self.queue.put(outputs)
        else:
            self.deliver(outputs)

    def deliver(self, outputs: list[tuple[Sequence, SequenceOutput]]) -> None:
        for s, out in outputs:
            try:
                self._consume(s, out)
                if out.finished:
                    s.end(out.error or s.error)
            except Exception as e:  # a bug in an `on_finish` (the async handle's guards its own code)
                print(f"nlg: error: delivering an output: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)

    def _consume(self, s: Sequence, out: SequenceOutput) -> None:
        before, s.delivered = s.delivered, s.delivered + len(out.token_ids)
        if s.kept is not None or s.on_output is None:
            return
        if not (out.token_ids or out.prompt_logprobs or out.prefilled is not None):
            return
        try:
            taken = s.on_output(out)
        except Exception as e:  # the request's own code (detokenizing, streaming, a task's callback)
            s.kept, s.error = before, RequestFailed(f"the request failed taking its tokens: {type(e).__name__}: {e}")
            self.stop(s, s.error)
            return
        if taken is not None:
            s.kept = before + taken
            self.stop(s, None)

    def _loop(self, outputs: queue.SimpleQueue) -> None:
        while (batch := outputs.get()) is not None:
            self.deliver(batch)
