"""The jobs thread of `nlg serve`: feeds pending records of the SQLite store to the engine at batch priority
(interactive requests go first), shared fairly between jobs (`JobStore.pending`). A crash loses only the
records in flight, which run again after the restart. A record that fails for any reason (not JSON, nested
too deep, a result JSON cannot write) gets its error row (with its `id`) and the runner goes on; one
refused because the engine's queue is full (`Overloaded`, from interactive load) stays pending and is
tried again after the Retry-After; after an engine failure the runner stops, leaving the records in flight
pending.

An OpenAI batch's line (`{custom_id, method, url, body}`) is sent as a request to the server's own
endpoint (`post`, in process, through the same validation and handlers as any client's request): a 2xx
is a line of the output file, anything else a line of the error file, both in OpenAI's shape.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from service import nesting
from service.engine.generator import TextGenerator
from service.errors import EngineFailed, InvalidRequest, Overloaded
from service.jobs.jsonl import field
from service.jobs.records import run_record
from service.jobs.store import JobStore, record_id


class Loop:
    """A daemon thread named `name` running `_loop` from `start` until `stop`; `wake` cuts its waits short."""

    def __init__(self, name: str):
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(60)

    def _loop(self) -> None:
        raise NotImplementedError


class JobRunner(Loop):
    """Feeds pending records to the engine, `workers` at a time, until stopped."""

    def __init__(self, gen: TextGenerator, store: JobStore, workers: int = 4):
        super().__init__("nlg-jobs")
        self.gen, self.store, self.workers = gen, store, workers
        # (endpoint, body) -> (status, headers, body): the server's own handling of an OpenAI batch line
        self.post: Callable[[str, dict], tuple[int, dict, dict]] | None = None

    def _loop(self) -> None:
        in_flight: dict[tuple[str, int], Future] = {}
        self.resume_at = 0.0  # after an Overloaded: no new record before then
        with ThreadPoolExecutor(self.workers) as pool:
            while not self.stopping:
                try:
                    for key in [k for k, f in in_flight.items() if f.done()]:
                        in_flight.pop(key)
                    room = self.workers - len(in_flight) if time.monotonic() >= self.resume_at else 0
                    pending = self.store.pending(room, set(in_flight)) if room else []
                    for job, task, line, text in pending:
                        in_flight[(job, line)] = pool.submit(self._one, job, task, line, text)
                except Exception as e:  # the store itself (a full disk): say so, try again shortly
                    print(f"nlg: error: batch jobs: {type(e).__name__}: {e}", file=sys.stderr)
                self.wake.wait(0.05 if in_flight else 1.0)
                self.wake.clear()

    def _one(self, job: str, task: str, line: int, text: str) -> None:
        """Run one record and store its result or its error; never raises."""
        try:
            record = nesting.loads(text)
            if task.startswith("/v1/"):
                result, error = self._request(task, record)
            else:
                result, error = field(record) | run_record(self.gen, task, record), None
        except Overloaded as e:  # interactive load fills the queue: the record waits its turn
            self.resume_at = time.monotonic() + e.retry_after
            return
        except EngineFailed:  # the server is going down: the record stays pending for the restart
            self.stopping = True
            return
        except Exception as e:  # anything else is this record's own failure
            result, error = None, self._error(task, text, e)
        self._save(job, task, line, text, result, error)
        self.wake.set()

    @staticmethod
    def _error(task: str, text: str, e: Exception) -> str:
        """A record's error row: the message, or for an OpenAI batch's error file a JSON line with it."""
        message = str(e) if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}"
        if not task.startswith("/v1/"):
            return message
        error = {"code": "request_failed", "message": message}
        custom_id = record_id(text, "custom_id").get("custom_id")
        return json.dumps({"id": None, "custom_id": custom_id, "response": None, "error": error})

    def _request(self, endpoint: str, record: dict) -> tuple[dict | None, str | None]:
        """One OpenAI batch line through the server: (output line, None) or (None, error line as JSON).
        Raises `Overloaded` and `EngineFailed` as the engine would, so the line waits or stays pending."""
        status, headers, body = self.post(endpoint, record["body"])
        if status == 429:
            raise Overloaded("the queue is full", int(headers.get("retry-after", "1")))
        if status == 503:
            raise EngineFailed(body.get("error", {}).get("message", "the engine failed"))
        out = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": record["custom_id"],
            "response": {"status_code": status, "request_id": body.get("id", ""), "body": body},
            "error": None,
        }
        return (out, None) if status < 300 else (None, json.dumps(out))

    def _save(self, job: str, task: str, line: int, text: str, result: dict | None, error: str | None) -> None:
        try:
            try:
                self.store.save(job, line, result, error)
            except (ValueError, TypeError, RecursionError) as e:  # a result JSON cannot write: its error instead
                self.store.save(job, line, None, self._error(task, text, e))
        except Exception as e:
            print(f"nlg: error: batch jobs: saving {job} line {line}: {type(e).__name__}: {e}", file=sys.stderr)
