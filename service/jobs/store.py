"""Batch jobs kept in SQLite, so that a restarted server picks up where it stopped: a job and its
records, each record's result or error stored in its own transaction (a record never gets two).

Two kinds of job share the records: the tasks' jobs (`task` answer or summarize, ids `job_...`) and
OpenAI's batches (`task` the endpoint each line is sent to, ids `batch_...`, with their input file and
window in `batches`). Files uploaded for OpenAI's Batch API are kept here too; a batch's output and error
files are made from its records when read (`file-<batch>-output`, `file-<batch>-errors`)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from service.jobs.jsonl import split_lines

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, task TEXT NOT NULL, state TEXT NOT NULL,
                                 created REAL NOT NULL, finished REAL);
CREATE TABLE IF NOT EXISTS records (job TEXT NOT NULL, line INTEGER NOT NULL, input TEXT NOT NULL,
                                    result TEXT, error TEXT, PRIMARY KEY (job, line));
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
                                  created REAL NOT NULL, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, input_file TEXT NOT NULL, window TEXT NOT NULL,
                                    metadata TEXT);
"""
OUTPUTS = ("output", "errors")  # the files a batch makes: its successes and its failures


class JobStore:
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def create(self, task: str, lines: list[str], prefix: str = "job") -> str:
        job = f"{prefix}_{uuid.uuid4().hex}"
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

    def pending(
        self, limit: int, exclude: set[tuple[str, int]], batches_only: bool = False
    ) -> list[tuple[str, str, int, str]]:
        """(job, task, line, input) of records without a result, oldest job first; with `batches_only`,
        only OpenAI batches' (the tasks' jobs then run elsewhere: `cluster_runner`)."""
        only = "AND j.task LIKE '/v1/%' " if batches_only else ""
        with self.lock:
            rows = self.db.execute(
                "SELECT r.job, j.task, r.line, r.input FROM records r JOIN jobs j ON j.id = r.job "
                f"WHERE j.state IN ('queued', 'running') AND r.result IS NULL AND r.error IS NULL {only}"
                "ORDER BY j.created, r.line LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        return [r for r in rows if (r[0], r[2]) not in exclude][:limit]

    def pending_tasks(self, limit: int) -> tuple[str, list[tuple[str, int, str]]]:
        """The task of the oldest tasks' job (not an OpenAI batch) with records left, and up to `limit`
        (job, line, input) of the records left in jobs of that task, oldest job first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT r.job, j.task, r.line, r.input FROM records r JOIN jobs j ON j.id = r.job "
                "WHERE j.state IN ('queued', 'running') AND r.result IS NULL AND r.error IS NULL "
                "AND j.task NOT LIKE '/v1/%' ORDER BY j.created, r.line LIMIT ?",
                (limit,),
            ).fetchall()
        task = rows[0][1] if rows else ""
        return task, [(job, line, text) for job, t, line, text in rows if t == task]

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

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        file = f"file-{uuid.uuid4().hex}"
        with self.lock:
            self.db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", (file, filename, purpose, time.time(), content))
        return self.file(file)

    def _output(self, file: str) -> tuple[dict, str] | None:
        """(the batch, "output" or "errors") for one of a batch's made files; None for any other id.
        Raises KeyError for the files of a batch that does not exist."""
        if not (file.startswith("file-batch_") and file.rsplit("-", 1)[-1] in OUTPUTS):
            return None
        job, kind = file[len("file-") :].rsplit("-", 1)
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
        self.file(file)
        with self.lock:
            self.db.execute("DELETE FROM files WHERE id = ?", (file,))
        return {"id": file, "object": "file", "deleted": True}

    def create_batch(self, input_file: str, endpoint: str, window: str, metadata: dict | None) -> dict:
        """An OpenAI batch of the input file's lines (checked by the caller), each sent to `endpoint`."""
        lines = split_lines(self.content(input_file).decode("utf-8"))
        job = self.create(endpoint, lines, prefix="batch")
        with self.lock:
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


def record_id(text: str) -> dict:
    """`{"id": ...}` of a record's input line when it is an object with one, else `{}`."""
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return {"id": record["id"]} if isinstance(record, dict) and "id" in record else {}
