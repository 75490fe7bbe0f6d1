"""The jobs thread of `nlg serve`: feeds pending records of the SQLite store to the engine at batch
priority (interactive requests go first). A crash loses only the records in flight, which run again
after the restart. A record that fails for any reason gets its error row (with its `id`) and the runner
goes on; one refused because the engine's queue is full (`Overloaded`, from interactive load) stays
pending and is tried again after the Retry-After; after an engine failure the runner stops, leaving the
records in flight pending.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from service.engine.generator import TextGenerator
from service.errors import EngineFailed, InvalidRequest, Overloaded
from service.jobs.records import run_record
from service.jobs.store import JobStore, record_id


class JobRunner:
    """Feeds pending records to the engine, `workers` at a time, until stopped."""

    def __init__(self, gen: TextGenerator, store: JobStore, workers: int = 4):
        self.gen, self.store, self.workers = gen, store, workers
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="nlg-jobs", daemon=True)

    def start(self) -> JobRunner:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(60)

    def _loop(self) -> None:
        in_flight: dict[tuple[str, int], Future] = {}
        self.resume_at = 0.0  # after an Overloaded: no new record before then
        with ThreadPoolExecutor(self.workers) as pool:
            while not self.stopping:
                try:
                    for key in [k for k, f in in_flight.items() if f.done()]:
                        in_flight.pop(key)
                    room = self.workers - len(in_flight) if time.monotonic() >= self.resume_at else 0
                    for job, task, line, text in self.store.pending(room, set(in_flight)) if room else []:
                        in_flight[(job, line)] = pool.submit(self._one, job, task, line, text)
                except Exception as e:  # the store itself (a full disk): say so, try again shortly
                    print(f"nlg: error: batch jobs: {type(e).__name__}: {e}", file=sys.stderr)
                self.wake.wait(0.05 if in_flight else 1.0)
                self.wake.clear()

    def _one(self, job: str, task: str, line: int, text: str) -> None:
        """Run one record and store its result or its error; never raises."""
        try:
            try:
                record = json.loads(text)
            except ValueError as e:
                raise InvalidRequest(f"invalid JSON: {e}") from None
            result = record_id(text) | run_record(self.gen, task, record)
        except Overloaded as e:  # interactive load fills the queue: the record waits its turn
            self.resume_at = time.monotonic() + e.retry_after
            return
        except EngineFailed:  # the server is going down: the record stays pending for the restart
            self.stopping = True
            return
        except Exception as e:  # anything else is this record's own failure
            self._save(job, line, None, str(e) if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}")
        else:
            self._save(job, line, result, None)
        self.wake.set()

    def _save(self, job: str, line: int, result: dict | None, error: str | None) -> None:
        try:
            self.store.save(job, line, result, error)
        except Exception as e:
            print(f"nlg: error: batch jobs: saving {job} line {line}: {type(e).__name__}: {e}", file=sys.stderr)
