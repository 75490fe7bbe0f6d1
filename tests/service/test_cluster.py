"""Batch jobs on Ray (`service.jobs.cluster`): a real local Ray cluster of 2 CPUs, tiny-random replicas.
Every job ends with exactly one line per record, whatever dies on the way (an actor SIGKILLed mid-job, the
driver SIGKILLed and the same command run again), and its output is the one-machine `nlg batch` output;
and a replica split over two ranks writes the same lines."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from service.engine.core import Engine
from service.jobs import cluster, ranks
from service.jobs.files import run_job

pytestmark = pytest.mark.heavy
ray = pytest.importorskip("ray")
RECORDS = 200
TINY = cluster.Replicas("tiny-random", {}, count=2)


@pytest.fixture
def local_ray():
    cluster.connect("local", cpus=2)
    yield
    ray.shutdown()


def write_input(path: Path, n: int = RECORDS, max_words: int = 30) -> Path:
    lines = [
        json.dumps(
            {
                "id": f"r{i}",
                "document": f"The dam opened in {1900 + i}. It cost {i} million dollars.",
                "max_words": max_words,
            }
        )
        for i in range(n)
    ]
    lines[7] = "not json"  # a record's own failure goes to the errors file, once too
    # a line separator inside a string, written raw: one record still, numbered as one line
    lines[3] = json.dumps({"id": "r3", "document": "The dam opened.\u2028It cost a lot."}, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n")
    return path


def keys(out: Path) -> list[int]:
    return [json.loads(line)["line"] for p in (out, cluster.errors_of(out)) for line in p.read_text().splitlines()]


def sorted_lines(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines(), key=lambda line: json.loads(line)["line"])


def first_shard(out: Path, timeout: float = 120) -> int:
    """Waits for the first committed shard; returns the records committed by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = list(cluster.parts_of(out).glob("part-*.jsonl")) if cluster.parts_of(out).exists() else []
        if shards:
            return sum(len(p.read_text().splitlines()) for p in shards)
        time.sleep(0.05)
    raise TimeoutError("no shard committed")


def test_two_replicas_write_each_record_once_as_one_machine_does(local_ray, tiny, tmp_path):
    """200 records over two actors: one line per record, both replicas worked, and the lines equal
    `nlg batch`'s on one machine (greedy), the bad line's error included. Both sides decode one record at a
    time on one torch thread (each replica's share of the 2 CPUs), without the prefix cache: a record's bits
    then depend on its own prompt alone. Batched, they depend on its neighbours too (the row count of each
    matmul, where a prefill chunk splits a prompt, keys cached by another batch), and tiny-random's near
    ties flip on such bits: record 35 came out two ways in a CI run with 16 at once."""
    src = write_input(tmp_path / "in.jsonl", max_words=8)
    alone = cluster.Replicas("tiny-random", {"prefix_caching": False}, count=2, slots=1)
    s = cluster.run_on_ray("summarize", src, tmp_path / "ray.jsonl", alone)
    assert (s.total, s.succeeded, s.failed) == (RECORDS, RECORDS - 1, 1)
    assert len(s.replicas) == 2 and all(n > 0 for n, _ in s.replicas.values()), s.replicas
    assert sorted(keys(tmp_path / "ray.jsonl")) == list(range(1, RECORDS + 1))
    assert not cluster.parts_of(tmp_path / "ray.jsonl").exists()  # merged
    one = copy.copy(tiny)
    one.engine = Engine(tiny.engine.model, tiny.tokenizer.stop_ids, prefix_caching=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(one, "summarize", src, tmp_path / "one.jsonl", workers=1)
    finally:
        torch.set_num_threads(threads)
    assert sorted_lines(tmp_path / "ray.jsonl") == sorted_lines(tmp_path / "one.jsonl")
    assert sorted_lines(tmp_path / "ray.errors.jsonl") == sorted_lines(tmp_path / "one.errors.jsonl")
    again = cluster.run_on_ray("summarize", src, tmp_path / "ray.jsonl", TINY)
    assert (again.skipped, again.succeeded + again.failed) == (RECORDS, 0)


def test_a_killed_replica_loses_nothing_and_repeats_nothing(local_ray, tmp_path):
    """An actor's process SIGKILLed mid-job (as a crash or a lost node would end it): Ray restarts it and
    retries its batches; the job still ends with exactly one line per record."""
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    result = {}
    job = threading.Thread(target=lambda: result.update(s=cluster.run_on_ray("summarize", src, out, TINY)))
    job.start()
    done_at_kill = first_shard(out)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "MapWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers and done_at_kill < RECORDS
    os.kill(workers[0].pid, signal.SIGKILL)
    job.join(300)
    assert not job.is_alive()
    assert sorted(keys(out)) == list(range(1, RECORDS + 1))
    assert not workers[0].is_running() and result["s"].succeeded + result["s"].failed == RECORDS


def test_a_killed_driver_reruns_to_exactly_once(tiny, tmp_path):
    """`nlg batch --ray` SIGKILLed after its first shard, then the same command again: it skips what was
    committed and ends with one line per record."""
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "service.cli", "batch", "summarize", str(src), "-o", str(out)]
    command += ["--model", "tiny-random", "--ray", "--replicas", "2"]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        assert first_shard(out) < RECORDS, (tmp_path / "driver.log").read_text()[-3000:]
        driver.kill()  # SIGKILL: no cleanup, no merge
        driver.wait(30)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the local cluster's processes too
    assert cluster.parts_of(out).exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done earlier" in rerun.stderr and " 0 already done" not in rerun.stderr
    assert sorted(keys(out)) == list(range(1, RECORDS + 1))


def test_a_replica_split_over_two_ranks_writes_what_one_process_does(local_ray, tmp_path):
    """`--tp 2` with `--ray`: the actor is rank 0 of two local ranks, and its lines equal a one-rank
    replica's; its other rank is gone when the job ends."""
    src = write_input(tmp_path / "in.jsonl", 24)
    cluster.run_on_ray("summarize", src, tmp_path / "one.jsonl", cluster.Replicas("tiny-random", {}, count=1))
    cluster.run_on_ray("summarize", src, tmp_path / "two.jsonl", cluster.Replicas("tiny-random", {}, count=1, tp=2))
    assert sorted_lines(tmp_path / "two.jsonl") == sorted_lines(tmp_path / "one.jsonl")
    time.sleep(2 * ranks.WATCH_S)
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if "service.jobs.ranks" in " ".join(p.info["cmdline"] or [])
    ]


def test_merge_keeps_one_line_per_key_and_ignores_unfinished_shards(tmp_path):
    """Shards holding the same record twice (a retried batch) and an unfinished temporary shard: the
    merge writes each key once, appends to what `out` had, and leaves no shards."""
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"line": 1, "summary": "a"}) + "\n")
    cluster.commit(
        cluster.parts_of(out), [json.dumps({"line": 2, "summary": "b"}), json.dumps({"line": 1, "summary": "x"})]
    )
    cluster.commit(
        cluster.parts_of(out), [json.dumps({"line": 2, "summary": "b"}), json.dumps({"line": 3, "error": "bad"})]
    )
    (cluster.parts_of(out) / ".part-9.tmp").write_text('{"line": 4, "summ')
    assert cluster.committed(out) == {("", 1), ("", 2), ("", 3)}
    cluster.merge(out)
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2]
    assert json.loads(out.read_text().splitlines()[0])["summary"] == "a"
    assert [json.loads(line)["line"] for line in cluster.errors_of(out).read_text().splitlines()] == [3]
    assert not cluster.parts_of(out).exists()


def test_without_ray_the_flag_fails_in_one_line(monkeypatch, capsys, tmp_path):
    """No ray installed: `--ray` is one error line naming the extra, exit 2."""
    from service.cli.parser import main

    monkeypatch.setitem(sys.modules, "ray", None)
    src = write_input(tmp_path / "in.jsonl", 10)
    code = main(["batch", "summarize", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", "tiny-random", "--ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"nlg: error: {cluster.EXTRA}"
