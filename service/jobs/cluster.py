"""Batch jobs on a Ray cluster: `nlg batch summarize|answer INPUT -o OUT --ray [ADDRESS]`.

Ray Data reads the JSONL input (one file, a folder's `*.jsonl` files, or a quoted glob; every line not
already in the output), and `map_batches` runs the lines through a pool of engine actors (`--replicas`,
each a `Replica` with its own model, `--replica-cpus` cores or GPUs reserved through Ray's resources).
The driver is the one writer: each batch of results that comes back is committed as a shard of
`OUT.parts/` (written to a temporary name, synced, renamed: a shard is there whole or not at all), and
when the job ends the shards are merged into `OUT` and `OUT.errors.jsonl`, the files `nlg batch` writes
on one machine, in the same shape (a result keyed by `line`, and `input` when several files are read).

Exactly once: a record's key (input file, line) is written at most once. A rerun after anything (an
actor killed, a node lost, the driver SIGKILLed) skips the keys already in `OUT`, its errors file and
the committed shards. Ray restarts a dead actor and retries its batches, and the driver drops any
result whose key it has already written (a retried batch can return some twice). An engine failure
inside a replica is an error of the job, not a death: the job stops, its committed shards kept.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidRequest
from service.jobs.jsonl import Summary, errors_of, glob_files, numbered, whole_lines

EXTRA = "--ray needs the ray extra: pip install -e '.[ray]'"
SLOTS = 16  # sequences a replica's engine runs at once, by default
BLOCK = 32  # records per block, about (Ray splits evenly); a replica takes one as it finishes one, returns it whole
READ_ROWS = 4096  # rows a read task holds before handing them on (Ray cuts them into blocks)
LOCAL_OBJECT_STORE = 512 << 20  # the local cluster's shared memory for blocks in flight


class MissingExtra(ValueError):
    """The CLI's one-line error: `ray` is not installed."""


def connect(address: str = "local", cpus: int | None = None) -> None:
    """Join the cluster at `address` (`auto`, `ray://host:10001`, `host:6379`), or with "local" start
    one on this machine (`cpus` cores, default all). Raises `MissingExtra` without ray."""
    try:
        import ray
    except ImportError:
        raise MissingExtra(EXTRA) from None
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE)
    else:
        ray.init(address=address)


def inputs(spec: str | Path) -> dict[str, str]:
    """The JSONL files of one file, a folder's `*.jsonl` (recursively) or a glob: each resolved path ->
    its name in the output's `input` field (its path under the folder; "" for a single file)."""
    spec = str(spec)
    if globbed := glob_files(spec):
        root, files = globbed
    elif Path(spec).is_dir():
        root, files = Path(spec), sorted(Path(spec).rglob("*.jsonl"))
    elif Path(spec).is_file():
        return {str(Path(spec).resolve()): ""}
    else:
        raise FileNotFoundError(f"no such file: {spec}")
    if not files:
        raise InvalidRequest(f"no JSONL files in {spec} (--ray reads records; a folder of documents runs without it)")
    return {str(p.resolve()): p.relative_to(root).as_posix() for p in files}


def key_of(row: dict) -> tuple[str, int]:
    return row.get("input", ""), row["line"]


def committed(out: Path) -> set[tuple[str, int]]:
    """The keys already written: in `out`, its errors file and its committed shards (a torn last line is
    cut off first, as `nlg batch` does)."""
    paths = (out, errors_of(out), *sorted(parts_of(out).glob("part-*.jsonl")))
    return {key_of(json.loads(line)) for path in paths for line in whole_lines(path) if line}


def parts_of(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def commit(folder: Path, lines: list[str]) -> None:
    """One shard, there whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    tmp = folder / f".{name}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"{name}.jsonl")


def merge(out: Path) -> None:
    """The committed shards' lines appended to `out` (results) and its errors file, each key once; then
    the shards are removed. Safe to interrupt: a torn line is cut off and the rerun merges again."""
    folder = parts_of(out)
    if not folder.exists():
        return
    rows = [line for p in sorted(folder.glob("part-*.jsonl")) for line in whole_lines(p)]
    for path, failed in ((out, False), (errors_of(out), True)):
        seen = {key_of(json.loads(line)) for line in whole_lines(path) if line}
        new = []
        for line in rows:
            row = json.loads(line)
            if ("error" in row) == failed and key_of(row) not in seen:
                seen.add(key_of(row))
                new.append(line + "\n")
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(new))
            f.flush()
            os.fsync(f.fileno())
    shutil.rmtree(folder)


def lines_datasource(names: dict[str, str], skip: set[tuple[str, int]]):
    """A Ray Data source of the records of the files `names` maps (resolved path -> name in the
    output) not in `skip`: one row per non-empty line, with its file's name and its line number."""
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    schema = pa.schema([("input", pa.string()), ("line", pa.int64()), ("text", pa.string())])

    def table(rows: list[tuple]) -> pa.Table:
        return pa.table(list(zip(*rows)) or [[], [], []], schema=schema)

    class Lines(FileBasedDatasource):
        def _read_stream(self, f, path: str):
            name, rows = names[str(Path(path).resolve())], []
            for n, line in numbered(io.TextIOWrapper(f, encoding="utf-8", errors="replace")):
                if (name, n) not in skip:
                    rows.append((name, n, line))
                if len(rows) == READ_ROWS:
                    yield table(rows)
                    rows = []
            yield table(rows)

    return Lines(list(names))


class Replica:
    """One engine replica in a Ray actor: its own model, its own scheduler batching the records of the
    blocks it is handed (two blocks at once, so that one's last records never leave slots idle): every
    record of a block is submitted at once and the scheduler runs `slots` of them at a time."""

    def __init__(self, task: str, model: str, options: dict, threads: int, tp: int = 1, slots: int = SLOTS):
        import torch

        from service.engine.generator import TextGenerator
        from service.jobs import ranks

        torch.set_num_threads(threads)
        self.ranks = ranks.start(tp, model, options, max(1, threads // tp)) if tp > 1 else []
        self.task = task
        self.gen = TextGenerator.load(model, **options)
        self.gen.engine.start(slots=slots)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        from service.jobs.files import outcome, parse

        def one(name, line, text) -> tuple[dict, bool, int]:
            key = ({"input": str(name)} if name else {}) | {"line": int(line)}
            return outcome(self.gen, self.task, key, *parse(str(text)))

        rows = list(zip(batch["input"], batch["line"], batch["text"]))
        with ThreadPoolExecutor(len(rows) or 1) as pool:
            done = list(pool.map(lambda r: one(*r), rows))
        return {
            "row": [json.dumps(row, ensure_ascii=False) for row, _, _ in done],
            "failed": [not ok for _, ok, _ in done],
            "tokens": [tokens for _, _, tokens in done],
            "replica": [self.name] * len(done),
        }


@dataclass
class Replicas:
    """The engine actors a job's records are mapped through: `count` replicas of `model` loaded with
    `options` (`TextGenerator.load`'s), each split over `tp` tensor-parallel ranks on one node
    (`ranks`), with `cpus` cores (default: the cluster's / `count`) for its torch threads, or one GPU
    per rank when `gpus`; each decodes `slots` records at once."""

    model: str
    options: dict
    count: int = 1
    cpus: float | None = None
    gpus: bool = False
    tp: int = 1
    slots: int = SLOTS

    def map(self, ds, task: str):
        """`ds` (rows of `input`, `line`, `text`) mapped to rows of `row` (the output line), `failed`,
        `tokens` and `replica` (host:pid)."""
        import ray
        from ray.data import ActorPoolStrategy

        cpus = self.cpus or max(1.0, ray.cluster_resources().get("CPU", 1) // self.count)
        pool = ActorPoolStrategy(size=self.count, max_concurrent_calls_per_actor=2, max_tasks_in_flight_per_actor=2)
        return ds.map_batches(
            Replica,
            fn_constructor_kwargs={
                "task": task,
                "model": self.model,
                "options": self.options,
                "threads": int(cpus),
                "tp": self.tp,
                "slots": self.slots,
            },
            compute=pool,
            batch_size=None,  # a block is one batch (no bundling of blocks): the grain of a commit
            batch_format="numpy",
            num_cpus=cpus if not self.gpus else self.tp,
            num_gpus=self.tp if self.gpus else 0,
        )


def run_on_ray(task: str, src: str | Path, out: Path, replicas: Replicas, on_start=None) -> Summary:
    """Run every record of `src` not yet written to `out` through the `replicas` on the connected
    cluster (`connect`), committing results as they come back; then merge (module doc)."""
    import ray

    from model.loader import read_config
    from model.registry import resolve

    if task not in ("summarize", "answer"):
        raise InvalidRequest(f"unknown batch task {task!r}: summarize or answer")
    names = inputs(src)
    # an unknown name or an impossible split fails here, and a local cluster's replicas find the model made
    read_config(resolve(replicas.model)).check_tp(replicas.tp)
    merge(out)  # an earlier run's shards first: its results then count as written
    skip = committed(out)
    keys = []
    for path, name in names.items():
        with open(path, encoding="utf-8", errors="replace") as f:
            keys += [(name, n) for n, _ in numbered(f)]
    total, left = len(keys), sum(k not in skip for k in keys)
    if on_start:
        on_start(left)
    start = time.perf_counter()
    summary = Summary(total, total - left, 0, 0, 0.0, 0)
    if left:
        source = lines_datasource(names, skip)
        ds = replicas.map(ray.data.read_datasource(source, num_cpus=0, override_num_blocks=-(-left // BLOCK)), task)
        written, per = set(skip), defaultdict(lambda: [0, 0])
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            lines = []
            for line, failed, tokens, replica in zip(batch["row"], batch["failed"], batch["tokens"], batch["replica"]):
                key = key_of(json.loads(line))
                if key in written:  # a retried batch's record, already committed
                    continue
                written.add(key)
                lines.append(str(line))
                summary.failed += bool(failed)
                summary.succeeded += not failed
                summary.completion_tokens += int(tokens)
                per[str(replica)][0] += 1
                per[str(replica)][1] += int(tokens)
            if lines:
                commit(parts_of(out), lines)
        summary.replicas = dict(per)
    merge(out)
    summary.seconds = time.perf_counter() - start
    return summary
