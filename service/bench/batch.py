"""`nlg bench batch`: the same summarization job on one machine (`nlg batch`) and on a local Ray cluster
with 1 and 2 replicas (`nlg batch --ray`), in one run, each a fresh process timed end to end (start-up,
model load and, for Ray, the cluster's start included): records/s, and each Ray run's ratio to one
machine. The outputs are checked line for line against the one-machine output (greedy)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.jobs.jsonl import split_lines, whole_lines

WORKERS = 16  # records in flight on one machine: as many as a replica's scheduler runs at once (`cluster.SLOTS`)


def run(model: str, data: str, limit: int, replicas: tuple[int, ...] = (1, 2), length: str = "short") -> dict:
    with tempfile.TemporaryDirectory(prefix="nlg-bench-batch-") as tmp:
        src = Path(tmp) / "in.jsonl"
        records = [json.loads(line) for line in split_lines(Path(data).read_text(encoding="utf-8")) if line][:limit]
        wanted = [{"id": r.get("id"), "document": r["document"], "length": length} for r in records]
        src.write_text("".join(json.dumps(r) + "\n" for r in wanted))
        base = [sys.executable, "-m", "service.cli", "batch", "summarize", str(src), "--model", model, "--quiet"]
        rows = []
        for n in (0, *replicas):
            out = Path(tmp) / f"out-{n}.jsonl"
            command = base + ["-o", str(out)] + (["--ray", "--replicas", str(n)] if n else ["--workers", str(WORKERS)])
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
            lines = sorted(whole_lines(out), key=lambda line: json.loads(line)["line"])
            rows.append({"replicas": n, "seconds": seconds, "records_per_s": len(lines) / seconds, "lines": lines})
    reference, rate = rows[0]["lines"], rows[0]["records_per_s"]
    for r in rows:
        r["ratio"] = r["records_per_s"] / rate
        r["identical"] = r.pop("lines") == reference
    return {"model": model, "data": data, "records": len(records), "length": length, "runs": rows}


def print_report(report: dict) -> str:
    lines = [
        f"{report['records']} summaries ({report['length']}) of {report['data']}, {report['model']}; "
        "each run a fresh process, start-up included",
        "",
        "| run | seconds | records/s | vs one machine | output identical |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        n = r["replicas"]
        name = f"Ray, {n} replica{'s' * (n > 1)}" if n else "one machine (nlg batch)"
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['records_per_s']:.2f} | {r['ratio']:.2f}x | "
            f"{'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines)
