"""Batch jobs over HTTP, kept in SQLite so a restarted server picks up where it stopped.

`POST /v1/batches?task=summarize|answer` takes JSONL (one record per line, as `nlg batch` reads);
`GET /v1/batches/{id}` gives the state and counts; `GET /v1/batches/{id}/results` the results as
JSONL (one line per input line: the fields, or `error`); `DELETE /v1/batches/{id}` cancels it.

A `JobRunner` thread feeds pending records to the engine at batch priority (interactive requests go
first) and stores each result in its own transaction: a crash loses only the records in flight,
which are run again after the restart, and a record never gets two results. A record that fails for
any reason gets its error row (with its `id`) and the runner goes on; one refused because the engine's
queue is full (`Overloaded`, from interactive load) stays pending and is tried again after the
Retry-After; after an engine failure the runner stops, leaving the records in flight pending.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from service.engine.generator import TextGenerator
from service.errors import EngineFailed, Overloaded
from service.jobs.files import run_record

MAX_JOB_BYTES = 64 * 1024 * 1024
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, task TEXT NOT NULL, state TEXT NOT NULL,
                                 created REAL NOT NULL, finished REAL);
CREATE TABLE IF NOT EXISTS records (job TEXT NOT NULL, line INTEGER NOT NULL, input TEXT NOT NULL,
                                    result TEXT, error TEXT, PRIMARY KEY (job, line));
"""


class JobStore:
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def create(self, task: str, lines: list[str]) -> str:
        job = f"batch_{uuid.uuid4().hex}"
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO jobs VALUES (?, ?, 'queued', ?, NULL)", (job, task, time.time()))
            self.db.executemany(
                "INSERT INTO records (job, line, input) VALUES (?, ?, ?)",
                [(job, n, line) for n, line in enumerate(lines, start=1) if line.strip()],
            )
            self.db.execute("COMMIT")
        return job

    def status(self, job: str) -> dict:
        with self.lock:
            row = self.db.execute("SELECT task, state, created, finished FROM jobs WHERE id = ?", (job,)).fetchone()
            if row is None:
                raise KeyError(job)
            total, ok, failed = self.db.execute(
                "SELECT COUNT(*), COUNT(result), COUNT(error) FROM records WHERE job = ?", (job,)
            ).fetchone()
        return {
            "id": job,
            "object": "batch",
            "task": row[0],
            "state": row[1],
            "created_at": row[2],
            "finished_at": row[3],
            "counts": {"total": total, "succeeded": ok, "failed": failed},
        }

    def results(self, job: str) -> list[dict]:
        self.status(job)
        with self.lock:
            rows = self.db.execute(
                "SELECT line, input, result, error FROM records WHERE job = ? AND "
                "(result IS NOT NULL OR error IS NOT NULL) ORDER BY line",
                (job,),
            ).fetchall()
        return [{"line": n} | (json.loads(r) if r else record_id(text) | {"error": e}) for n, text, r, e in rows]

    def cancel(self, job: str) -> dict:
        self.status(job)
        with self.lock:
            self.db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state IN ('queued', 'running')",
                (time.time(), job),
            )
        return self.status(job)

    def pending(self, limit: int, exclude: set[tuple[str, int]]) -> list[tuple[str, str, int, str]]:
        """(job, task, line, input) of records without a result, oldest job first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT r.job, j.task, r.line, r.input FROM records r JOIN jobs j ON j.id = r.job "
                "WHERE j.state IN ('queued', 'running') AND r.result IS NULL AND r.error IS NULL "
                "ORDER BY j.created, r.line LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        return [r for r in rows if (r[0], r[2]) not in exclude][:limit]

    def save(self, job: str, line: int, result: dict | None, error: str | None) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute(
                "UPDATE records SET result = ?, error = ? WHERE job = ? AND line = ?",
                (json.dumps(result) if result is not None else None, error, job, line),
            )
            left = self.db.execute(
                "SELECT COUNT(*) FROM records WHERE job = ? AND result IS NULL AND error IS NULL", (job,)
            ).fetchone()[0]
            state = "completed" if left == 0 else "running"
            self.db.execute(
                "UPDATE jobs SET state = ?, finished = CASE WHEN ? = 'completed' THEN ? END "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (state, state, time.time(), job),
            )
            self.db.execute("COMMIT")


def record_id(text: str) -> dict:
    """`{"id": ...}` of a record's input line when it is an object with one, else `{}`."""
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return {"id": record["id"]} if isinstance(record, dict) and "id" in record else {}


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
            record = json.loads(text)
            result = record_id(text) | run_record(self.gen, task, record)
        except Overloaded as e:  # interactive load fills the queue: the record waits its turn
            self.resume_at = time.monotonic() + e.retry_after
            return
        except EngineFailed:  # the server is going down: the record stays pending for the restart
            self.stopping = True
            return
        except Exception as e:  # anything else is this record's own failure
            self._save(job, line, None, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))
        else:
            self._save(job, line, result, None)
        self.wake.set()

    def _save(self, job: str, line: int, result: dict | None, error: str | None) -> None:
        try:
            self.store.save(job, line, result, error)
        except Exception as e:
            print(f"nlg: error: batch jobs: saving {job} line {line}: {type(e).__name__}: {e}", file=sys.stderr)


def build_jobs_router(store: JobStore, runner: JobRunner) -> APIRouter:
    router = APIRouter(prefix="/v1/batches")

    def found(fn, job: str):
        try:
            return fn(job)
        except KeyError:
            raise HTTPException(404, f"no batch {job!r}") from None

    @router.post("")
    async def create(request: Request, task: str = Query(pattern="^(summarize|answer)$")) -> dict:
        body = await request.body()
        if not body.strip():
            raise HTTPException(400, "the batch is empty: send JSONL, one record per line")
        try:
            lines = body.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise HTTPException(400, "the batch is not UTF-8 text") from None
        job = store.create(task, lines)
        runner.wake.set()
        return store.status(job)

    @router.get("/{job}")
    def status(job: str) -> dict:
        return found(store.status, job)

    @router.get("/{job}/results")
    def results(job: str) -> Response:
        rows = found(store.results, job)
        return Response(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), media_type="application/x-ndjson"
        )

    @router.delete("/{job}")
    def cancel(job: str) -> dict:
        return found(store.cancel, job)

    return router
