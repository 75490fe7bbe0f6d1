"""The engine's output stage: consumers see each step's tokens after the step, on a thread of their own
while the engine runs its thread; a sequence its consumer stops ends where the consumer stopped it, whatever
the engine made meanwhile; a consumer that raises fails its own sequence alone."""

from __future__ import annotations

import threading
import time

import pytest

from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams
from service.errors import RequestFailed

PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)
PROMPTS = [[5, 17, 42], [9, 8, 7, 6]]


@pytest.fixture
def free(varied):
    """Each prompt's 40 greedy tokens, nothing stopping them."""
    return [c.token_ids for c in Engine(varied).generate(PROMPTS, [PARAMS] * 2)]


def consumer(stop_at: int, threads: list[str], slow: float = 0.0):
    """Sequence 0's consumer stops it at its `stop_at`-th token (after `slow` s there); both record the thread."""
    seen = {0: 0, 1: 0}

    def on_output(i, out):
        threads.append(threading.current_thread().name)
        for k, _ in enumerate(out.token_ids):
            seen[i] += 1
            if i == 0 and seen[i] == stop_at:
                time.sleep(slow)
                return k + 1
        return None

    return on_output


def test_a_stop_found_after_the_step_drops_what_the_engine_made_meanwhile(varied, free):
    """With the engine thread running, consumers run on the output stage's thread; while sequence 0's consumer
    takes 0.3 s over its stop, the engine decodes on, and the result still ends at the stop."""
    engine = Engine(varied, prompt_lookup=0).start(slots=2)
    threads: list[str] = []
    try:
        seqs = engine.sequences(PROMPTS, [PARAMS] * 2, consumer(5, threads, slow=0.3))
        done = engine.run(seqs)
    finally:
        engine.stop()
    assert set(threads) == {"nlg-output"}
    assert len(seqs[0].output) > 5  # the engine went on while the consumer was busy
    assert (done[0].token_ids, done[0].finish_reason) == (free[0][:5], "stop")
    assert (done[1].token_ids, done[1].finish_reason) == (free[1], "length")
    assert engine.scheduler.pool.used() == 0


def test_on_the_calling_thread_a_stop_ends_the_sequence_before_the_next_step(varied, free):
    """Without the engine thread the output stage runs after each turn on the calling thread: the stop is
    applied at the next turn, before any step, so nothing past it is made."""
    engine = Engine(varied, prompt_lookup=0)
    threads: list[str] = []
    seqs = engine.sequences(PROMPTS, [PARAMS] * 2, consumer(5, threads))
    done = engine.run(seqs)
    assert set(threads) == {threading.current_thread().name}
    assert seqs[0].output == free[0][:5] and done[0].finish_reason == "stop"
    assert done[1].token_ids == free[1]


@pytest.mark.parametrize("threaded", [False, True])
def test_a_consumer_that_raises_fails_its_sequence_alone(varied, free, threaded):
    """A consumer's exception fails its own sequence (`RequestFailed`, naming it); the other sequence ends as
    it would have and the engine serves the next call, on either thread."""
    engine = Engine(varied)
    if threaded:
        engine.start(slots=2)

    def on_output(i, out):
        if i == 0 and len(out.token_ids):
            raise KeyError("a bug in the request's own code")
        return None

    try:
        seqs = engine.sequences(PROMPTS, [PARAMS] * 2, on_output)
        with pytest.raises(RequestFailed, match="KeyError"):
            engine.run(seqs)
        for s in seqs:
            s.done.wait(30)
        assert seqs[1].error is None and seqs[1].completion().token_ids == free[1]
        assert engine.generate(PROMPTS[:1], [PARAMS])[0].token_ids == free[0]  # the engine goes on
    finally:
        engine.stop()
