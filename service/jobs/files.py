"""Batch jobs: JSONL in, JSONL out, resumable.

Each input line is one record; each result line carries the input's line number (1-based) and `id`
when the record has one. Results are appended and flushed one line at a time, so a crash or Ctrl-C
loses at most the records in flight; running the same command again skips every line already in
the output (or in the errors file), so nothing is lost and nothing is written twice. A torn last
line (killed mid-write) is cut off before appending. Records that fail (bad input, too long) go to
`OUT.errors.jsonl` with their line number and the message.

Records run concurrently through the engine's scheduler, which batches them (batch work runs at a
lower priority than interactive requests when a server shares the engine).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from service import nesting
from service.engine.generator import TextGenerator
from service.errors import DeadlineExceeded, EngineFailed, InvalidRequest
from service.jobs.jsonl import Summary, done_lines, errors_of, field, glob_files, numbered
from service.jobs.records import run_record


def named_files(spec: str | Path) -> tuple[Path, list[Path]] | None:
    """(the folder, its documents in name order) for a folder or a glob (`docs/*.pdf`, `mail/**/*.eml`),
    every regular file under it; None for a single file (a JSONL of records)."""
    if globbed := glob_files(str(spec)):
        return globbed
    path = Path(spec)
    if path.is_dir():
        return path, sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return None


def file_records(root: Path, paths: list[Path]) -> Iterator[tuple[str, dict | None, str | None]]:
    """(the file's name under `root`, a summarize record of its text, a conversion error) per file,
    read as it is reached, each in a child process bounded in memory and time (`service.convert`)."""
    from service.convert import TIMEOUT_S, convert

    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            yield name, {"id": name, "document": convert(path.read_bytes(), path.name, TIMEOUT_S).text()}, None
        except (InvalidRequest, DeadlineExceeded) as e:
            yield name, None, str(e)


def read_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record, parse error) for every non-empty line."""
    with path.open(encoding="utf-8") as f:
        for n, line in numbered(f):
            yield n, *parse(line)


def parse(line: str) -> tuple[dict | None, str | None]:
    try:
        return nesting.loads(line), None
    except InvalidRequest as e:  # not JSON, or nested too deep to write back
        return None, str(e)


def outcome(gen: TextGenerator, task: str, key: dict, record, parse_error: str | None) -> tuple[dict, bool, int]:
    """One record's output line (its `key`, its `id`, then its result fields or its error), whether it
    succeeded, and its completion tokens. Only an engine failure raises."""
    key = key | field(record)
    try:
        if parse_error:
            raise InvalidRequest(parse_error)
        fields = run_record(gen, task, record)
    except EngineFailed:
        raise
    except Exception as e:  # this record's own failure: its error row, and the job goes on
        return key | {"error": str(e) if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}"}, False, 0
    return key | fields, True, fields["completion_tokens"]


class Appender:
    """Append JSON lines to a file, one flushed write per line, from several threads."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self.lock:
            self.file.write(line)
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def run_job(
    gen: TextGenerator,
    task: str,
    src: Path | str,
    out: Path,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Summary:
    """Process every line of `src` not yet in `out` (or its errors file); or, for summaries, every document
    of a folder or glob (`named_files`), each result keyed by its file name instead of a line number.
    `on_start(n)` learns how many records are left to do; `progress(tokens)` is called once per finished
    record, on this thread."""
    if task not in ("summarize", "answer"):
        raise InvalidRequest(f"unknown batch task {task!r}: summarize or answer")
    folder = named_files(src)
    if folder is not None and task != "summarize":
        raise InvalidRequest("a folder or glob of documents is summarized; answers take a JSONL of questions")
    if folder is None and not Path(src).is_file():
        raise FileNotFoundError(f"no such file: {src}")
    errors_path = errors_of(out)
    key = "line" if folder is None else "file"
    skip = done_lines(out, key) | done_lines(errors_path, key)
    if folder is None:
        records = list(read_records(Path(src)))
    else:
        names = [p.relative_to(folder[0]).as_posix() for p in folder[1]]
        records = [(n, None, None) for n in names]  # read when its turn comes (below)
    todo = [(n, r, e) for n, r, e in records if n not in skip]
    left = len(todo)
    if folder is not None:
        wanted = {n for n, _, _ in todo}
        todo = file_records(folder[0], [p for p in folder[1] if p.relative_to(folder[0]).as_posix() in wanted])
    if on_start:
        on_start(left)
    results, errors = Appender(out), Appender(errors_path)
    start, counts = time.perf_counter(), {"ok": 0, "error": 0, "tokens": 0}

    def one(item: tuple[int | str, dict | None, str | None]) -> tuple[str, int]:
        n, record, parse_error = item
        row, ok, tokens = outcome(gen, task, {"line": n} if folder is None else {"file": n}, record, parse_error)
        (results if ok else errors).write(row)
        return ("ok" if ok else "error"), tokens

    def done(outcome: tuple[str, int]) -> None:
        kind, tokens = outcome
        counts[kind] += 1
        counts["tokens"] += tokens
        if progress:
            progress(tokens)

    try:
        in_flight(gen, one, todo, workers, done)
    finally:
        results.close()
        errors.close()
    return Summary(
        len(records),
        len(records) - left,
        counts["ok"],
        counts["error"],
        time.perf_counter() - start,
        counts["tokens"],
    )


def in_flight(gen: TextGenerator, fn: Callable, items, workers: int, on_done: Callable) -> None:
    """`fn(item)` for every item, `workers` at a time (no more: an interruption leaves little undone),
    through the engine's thread, which batches them (started here when it does not run).
    `on_done(result)` is called on this thread as each finishes; an engine failure is re-raised."""
    own = not gen.engine.running  # a server's engine runs already
    if own:
        gen.engine.start(slots=workers)
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending: set[Future] = set()
            for item in items:
                pending.add(pool.submit(fn, item))
                if len(pending) >= workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        on_done(f.result())
            for f in wait(pending).done:
                on_done(f.result())
    finally:
        if own:
            gen.engine.stop()
