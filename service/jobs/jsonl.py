"""The JSONL files a batch job writes: its results, and its errors beside them (`OUT.errors.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path


def errors_of(out: Path) -> Path:
    """Where the records that failed go, beside the results file `out`."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")


def done_lines(path: Path, key: str = "line") -> set:
    """The `key` (line numbers, or a folder's file names) of every result already written to `path`;
    cuts a torn last line off the file first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    return {json.loads(line).get(key) for line in data.splitlines() if line.strip()}
