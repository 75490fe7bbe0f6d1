"""Batch jobs kept in SQLite, so that a restarted server picks up where it stopped: a job and its
records, each record's result or error stored in its own transaction (a record never gets two).

Two kinds of job share the records: the tasks' jobs (`task` answer or summarize, ids `job_...`) and
OpenAI's batches (`task` the endpoint each line is sent to, ids `batch_...`, with their input file and
window in `batches`). Files uploaded for OpenAI's Batch API are kept here too; a batch's output and error
files are made from its records when read (`file-<batch>-output`, `file-<batch>-errors`), and a deleted one
is remembered in `deleted_outputs`. Writes of more than one row are one transaction, rolled back whole on
any error."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service import nesting
from service.errors import InvalidRequest
from service.jobs.jsonl import field, numbered, split_lines

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, task TEXT NOT NULL, state TEXT NOT NULL,
                                 created REAL NOT NULL, finished REAL);
CREATE TABLE IF NOT EXISTS records (job TEXT NOT NULL, line INTEGER NOT NULL, input TEXT NOT NULL,
                                    result TEXT, error TEXT, PRIMARY KEY (job, line));
CREATE INDEX IF NOT EXISTS open_records ON records (job, line) WHERE result IS NULL AND error IS NULL;
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
                                  created REAL NOT NULL, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, input_file TEXT NOT NULL, window TEXT NOT NULL,
                                    metadata TEXT);
CREATE TABLE IF NOT EXISTS deleted_outputs (id TEXT PRIMARY KEY);
"""
OUTPUTS = ("output", "errors")  # the files a batch makes: its successes and its failures


class JobStore:
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The store's lock and one transaction: committed at the end, rolled back by any exception (the
        connection is never left inside a transaction, which would fail every later BEGIN)."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def create(self, task: str, lines: list[str], prefix: str = "job") -> str:
        """A job of the non-blank lines (`InvalidRequest` when there are none)."""
        records = list(numbered(lines))
        if not records:
            raise InvalidRequest("the batch has no records: send JSONL, one record per line")
        job = f"{prefix}_{uuid.uuid4().hex}"
        with self.transaction():
            self._add_job(job, task, records)
        return job

    def _add_job(self, job: str, task: str, records: list[tuple[int, str]]) -> None:
        self.db.execute("INSERT INTO jobs VALUES (?, ?, 'queued', ?, NULL)", (job, task, time.time()))
        self.db.executemany("INSERT INTO records (job, line, input) VALUES (?, ?, ?)", [(job, *r) for r in records])

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
        return [{"line": n} | (_stored(r) if r else record_id(text) | {"error": e}) for n, text, r, e in rows]

    def cancel(self, job: str) -> dict:
        self.status(job)
        with self.lock:
            self.db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state IN ('queued', 'running')",
                (time.time(), job),
            )
        return self.status(job)

    def pending(self, limit: int, exclude: set[tuple[str, int]]) -> list[tuple[str, str, int, str]]:
        """(job, task, line, input) of up to `limit` records without a result, not in `exclude` (those in
        flight), shared fairly between the jobs with records left: the next slot goes to the job with the
        fewest records in flight, the oldest job first among equals, so a job created behind a long one
        starts at once."""
        ranked = []
        with self.lock:
            jobs = self.db.execute(
                "SELECT id, task FROM jobs WHERE state IN ('queued', 'running') ORDER BY created"
            ).fetchall()
            for age, (job, task) in enumerate(jobs):
                busy = sum(j == job for j, _ in exclude)
                rows = self.db.execute(
                    "SELECT line, input FROM records WHERE job = ? AND result IS NULL AND error IS NULL "
                    "ORDER BY line LIMIT ?",
                    (job, limit + busy),
                ).fetchall()
                free = [(line, text) for line, text in rows if (job, line) not in exclude]
                ranked += [(busy + k, age, job, task, line, text) for k, (line, text) in enumerate(free)]
        return [(job, task, line, text) for *_, job, task, line, text in sorted(ranked)[:limit]]

    def save(self, job: str, line: int, result: dict | None, error: str | None) -> None:
        """Store a record's result or error. A result JSON cannot write raises (ValueError, TypeError,
        RecursionError) before anything is changed: the caller stores an error instead."""
        encoded = json.dumps(result) if result is not None else None
        with self.transaction():
            self.db.execute(
                "UPDATE records SET result = ?, error = ? WHERE job = ? AND line = ?", (encoded, error, job, line)
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

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        file = f"file-{uuid.uuid4().hex}"
        with self.lock:
            self.db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", (file, filename, purpose, time.time(), content))
        return self.file(file)

    def _output(self, file: str) -> tuple[dict, str] | None:
        """(the batch, "output" or "errors") for one of a batch's made files; None for any other id.
        Raises KeyError for the files of a batch that does not exist."""
        if not _made(file):
            return None
        job, kind = file[len("file-") :].rsplit("-", 1)
        with self.lock:
            if self.db.execute("SELECT 1 FROM deleted_outputs WHERE id = ?", (file,)).fetchone():
                raise KeyError(file)
        return self.batch(job), kind

    def file(self, file: str) -> dict:
        """A file's OpenAI description (raises KeyError for an unknown one)."""
        if made := self._output(file):
            batch, kind = made
            return _file(
                file, f"{batch['id']}_{kind}.jsonl", "batch_output", batch["created_at"], len(self.content(file))
            )
        with self.lock:
            row = self.db.execute(
                "SELECT filename, purpose, created, length(content) FROM files WHERE id = ?", (file,)
            ).fetchone()
        if row is None:
            raise KeyError(file)
        return _file(file, *row)

    def content(self, file: str) -> bytes:
        if made := self._output(file):
            batch, kind = made
            column = "result" if kind == "output" else "error"
            with self.lock:
                rows = self.db.execute(
                    f"SELECT {column} FROM records WHERE job = ? AND {column} IS NOT NULL ORDER BY line",
                    (batch["id"],),
                ).fetchall()
            return "".join(r[0] + "\n" for r in rows).encode()
        with self.lock:
            row = self.db.execute("SELECT content FROM files WHERE id = ?", (file,)).fetchone()
        if row is None:
            raise KeyError(file)
        return bytes(row[0])

    def files(self) -> list[dict]:
        with self.lock:
            ids = [r[0] for r in self.db.execute("SELECT id FROM files ORDER BY created DESC").fetchall()]
        return [self.file(i) for i in ids]

    def delete_file(self, file: str) -> dict:
        """Delete an upload, or a batch's output or error file (KeyError for an unknown one)."""
        self.file(file)
        with self.lock:
            if _made(file):  # made from the records when read: remembered as deleted
                self.db.execute("INSERT OR IGNORE INTO deleted_outputs VALUES (?)", (file,))
            else:
                self.db.execute("DELETE FROM files WHERE id = ?", (file,))
        return {"id": file, "object": "file", "deleted": True}

    def create_batch(self, input_file: str, endpoint: str, window: str, metadata: dict | None) -> dict:
        """An OpenAI batch of the input file's lines (checked by the caller), each sent to `endpoint`."""
        records = list(numbered(split_lines(self.content(input_file).decode("utf-8"))))
        job = f"batch_{uuid.uuid4().hex}"
        with self.transaction():  # the job and its batch row together, or neither
            self._add_job(job, endpoint, records)
            self.db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?)",
                (job, input_file, window, json.dumps(metadata) if metadata is not None else None),
            )
        return self.batch(job)

    def batch(self, job: str) -> dict:
        """The OpenAI Batch object of a batch (KeyError for an unknown one)."""
        with self.lock:
            row = self.db.execute("SELECT input_file, window, metadata FROM batches WHERE id = ?", (job,)).fetchone()
        if row is None:
            raise KeyError(job)
        status = self.status(job)
        counts, state = status["counts"], status["state"]
        done = counts["succeeded"] + counts["failed"]
        return {
            "id": job,
            "object": "batch",
            "endpoint": status["task"],
            "errors": None,
            "input_file_id": row[0],
            "completion_window": row[1],
            "status": {"queued": "in_progress", "running": "in_progress"}.get(state, state),
            "output_file_id": f"file-{job}-output" if counts["succeeded"] else None,
            "error_file_id": f"file-{job}-errors" if counts["failed"] else None,
            "created_at": int(status["created_at"]),
            "in_progress_at": int(status["created_at"]),
            "expires_at": int(status["created_at"]) + 24 * 3600,
            "completed_at": int(status["finished_at"]) if state == "completed" and status["finished_at"] else None,
            "cancelled_at": int(status["finished_at"]) if state == "cancelled" and status["finished_at"] else None,
            "request_counts": {"total": counts["total"], "completed": done, "failed": counts["failed"]},
            "metadata": json.loads(row[2]) if row[2] else None,
        }

    def batches(self) -> list[dict]:
        with self.lock:
            ids = [
                r[0]
                for r in self.db.execute(
                    "SELECT b.id FROM batches b JOIN jobs j ON j.id = b.id ORDER BY j.created DESC"
                )
            ]
        return [self.batch(i) for i in ids]


def _made(file: str) -> bool:
    """Whether `file` names a batch's output or error file (made from its records, never uploaded)."""
    return file.startswith("file-batch_") and file.rsplit("-", 1)[-1] in OUTPUTS


def _file(file: str, filename: str, purpose: str, created: float, size: int) -> dict:
    return {
        "id": file,
        "object": "file",
        "bytes": size,
        "created_at": int(created),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def record_id(text: str, key: str = "id") -> dict:
    """`{key: ...}` of a record's input line when it is an object with one, else `{}` (also for a line
    that is not JSON or nests too deep)."""
    try:
        return field(nesting.loads(text), key)
    except InvalidRequest:
        return {}


def _stored(text: str) -> dict:
    """A stored result's fields (an error for one written before results were bounded that no longer reads)."""
    try:
        return nesting.loads(text)
    except InvalidRequest as e:
        return {"error": f"the stored result cannot be read: {e}"}
