"""The JSONL files a batch job writes (its results, and its errors beside them: `OUT.errors.jsonl`), and
what it reports when it ends."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Summary:
    total: int
    skipped: int  # done in an earlier run
    succeeded: int
    failed: int
    seconds: float
    completion_tokens: int
    replicas: dict[str, list[int]] = field(default_factory=dict)  # on Ray: replica -> [records, tokens]


def field(record, key: str = "id") -> dict:
    """`{key: ...}` of a parsed record when it is an object with that key, else `{}`."""
    return {key: record[key]} if isinstance(record, dict) and key in record else {}


def errors_of(out: Path) -> Path:
    """Where the records that failed go, beside the results file `out`."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")


def glob_files(spec: str) -> tuple[Path, list[Path]] | None:
    """(the folder before the first wildcard, the files matching, in order) for a glob such as
    `docs/*.pdf` or `mail/**/*.eml`; None when `spec` has no wildcard."""
    parts = Path(spec).parts
    cut = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
    if cut is None:
        return None
    root = Path(*parts[:cut]) if cut else Path(".")
    return root, sorted(p for p in root.glob(str(Path(*parts[cut:]))) if p.is_file())


def split_lines(text: str) -> list[str]:
    """A JSONL text cut at its newlines only: `str.splitlines` also cuts at U+2028, U+0085 and the other
    separators a JSON string may hold unescaped (`ensure_ascii=False` writes them raw), cutting a record
    in two."""
    return text.split("\n")


def numbered(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of each line that is not blank: how a JSONL input's records are keyed."""
    return ((n, line) for n, line in enumerate(lines, start=1) if line.strip())


def done_lines(path: Path, key: str = "line") -> set:
    """The `key` (line numbers, or a folder's file names) of every result already written to `path`;
    cuts a torn last line off the file first."""
    return {json.loads(line).get(key) for line in whole_lines(path) if line.strip()}


def whole_lines(path: Path) -> list[str]:
    """The lines of `path` (none where it is missing), after cutting off a last line that a kill tore
    in the middle of its write."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    return split_lines(data.decode("utf-8"))[:-1]  # the text after the last newline: none
