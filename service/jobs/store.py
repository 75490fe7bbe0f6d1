"""Batch jobs kept in SQLite, so that a restarted server picks up where it stopped: a job and its
records, each record's result or error stored in its own transaction (a record never gets two)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

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
