"""Batch jobs: one result per input line, errors beside them, resume without loss or duplicates."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.jobs.files import run_job
from service.jobs.jsonl import done_lines


def write_input(path: Path, n: int, length: str = "short") -> None:
    with path.open("w") as f:
        for i in range(n):
            if i == 3:
                f.write("{not json\n")
            elif i == 5:
                f.write(json.dumps({"id": "no-doc"}) + "\n")
            else:
                f.write(json.dumps({"id": f"d{i}", "document": f"Report {i}. " * (i % 5 + 2), "length": length}) + "\n")


def lines_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_results_errors_and_resume(tiny, tmp_path):
    """A batch job writes one result or one error row per line (with its id), and a rerun skips every line already
    done."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 12)
    first = run_job(tiny, "summarize", src, out, workers=4)
    assert (first.succeeded, first.failed, first.skipped) == (10, 2, 0)
    results, errors = lines_of(out), lines_of(tmp_path / "out.errors.jsonl")
    assert sorted(r["line"] for r in results) == [1, 2, 3, 5, 7, 8, 9, 10, 11, 12]
    assert {e["line"]: e.get("id") for e in errors} == {4: None, 6: "no-doc"}
    assert all(isinstance(r["summary"], str) and r["id"] == f"d{r['line'] - 1}" for r in results)
    again = run_job(tiny, "summarize", src, out, workers=4)
    assert (again.succeeded, again.failed, again.skipped) == (0, 0, 12)
    assert len(lines_of(out)) == 10


def test_a_torn_last_line_is_cut_and_redone(tiny, tmp_path):
    """A result line torn by a kill mid-write is dropped and its record redone, not parsed as garbage or lost."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 4)
    run_job(tiny, "summarize", src, out, workers=2)
    kept = out.read_text().splitlines()
    out.write_text("\n".join(kept[:-1]) + "\n" + kept[-1][:10])  # killed mid-write
    assert len(done_lines(out)) == len(kept) - 1
    s = run_job(tiny, "summarize", src, out, workers=2)
    assert s.succeeded == 1 and sorted(r["line"] for r in lines_of(out)) == sorted(json.loads(k)["line"] for k in kept)


@pytest.mark.heavy
def test_sigkill_and_restart_give_exactly_one_result_per_line(tmp_path):
    """SIGKILL during a batch and a restart give exactly one result per input line: none lost, none twice."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 40, length="long")
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "batch",
        "summarize",
        str(src),
        "-o",
        str(out),
        "--model",
        "tiny-random",
        "--quiet",
        "--workers",
        "4",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(lines_of(out)) < 3:
        assert time.time() < deadline and proc.poll() is None, "no progress before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(lines_of(out))
    assert partial < 38, "finished before the kill: make the job longer"
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, timeout=300)
    done = [r["line"] for r in lines_of(out)] + [e["line"] for e in lines_of(tmp_path / "out.errors.jsonl")]
    assert sorted(done) == list(range(1, 41))


def test_http_batch_job_round_trip_and_resume_after_restart(tiny, tmp_path):
    """Records stored in SQLite; a new app on the same file finishes what the first one left."""
    from fastapi.testclient import TestClient

    from service.jobs.store import JobStore
    from service.server.app import build_app

    db = tmp_path / "jobs.sqlite"
    src = tmp_path / "in.jsonl"
    write_input(src, 8)
    store = JobStore(db)  # a job left by a server that died before running it
    job = store.create("summarize", src.read_text().splitlines())
    with TestClient(build_app(tiny, jobs_db=str(db))) as c:
        deadline = time.time() + 60
        while (status := c.get(f"/v1/jobs/{job}").json())["state"] != "completed":
            assert time.time() < deadline, status
            time.sleep(0.1)
        assert status["counts"] == {"total": 8, "succeeded": 6, "failed": 2}
        rows = [json.loads(x) for x in c.get(f"/v1/jobs/{job}/results").text.splitlines()]
        assert [r["line"] for r in rows] == list(range(1, 9))
        assert "error" in rows[3] and rows[0]["id"] == "d0" and "summary" in rows[0]

        # a raw U+2028 inside a string does not cut its record in two (str.splitlines would)
        record = json.dumps({"question": "Who?\u2028Say it."}, ensure_ascii=False)
        created = c.post("/v1/jobs?task=answer", content=record.encode() + b"\n").json()
        assert created["state"] in ("queued", "running", "completed") and created["counts"]["total"] == 1
        assert c.delete(f"/v1/jobs/{created['id']}").json()["state"] in ("cancelled", "completed")
        assert c.get("/v1/jobs/job_nope").status_code == 404
        assert c.post("/v1/jobs?task=translate", content="{}").status_code == 400


def test_records_can_ask_for_scores(tiny, tmp_path):
    """`evaluate` on a record scores its own output; a bad one is an error line, nothing generated."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {
            "question": "Who won?",
            "passages": ["The Broncos won."],
            "evaluate": {"metrics": ["qa", "support"], "references": ["Broncos"]},
        },
        {"question": "Who won?", "evaluate": {"metrics": ["rouge"]}},
        {"question": "Who won?", "evaluate": ["qa"]},
        {"question": "Who won?"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_job(tiny, "answer", src, out, workers=2)
    assert (summary.succeeded, summary.failed) == (2, 2)
    results = {r["line"]: r for r in lines_of(out)}
    assert set(results[1]["scores"]) == {"exact_match", "f1", "containment", "support", "entities", "unsupported"}
    assert "scores" not in results[4]
    errors = {e["line"]: e["error"] for e in lines_of(tmp_path / "out.errors.jsonl")}
    assert "needs references" in errors[2] and "evaluate must be" in errors[3]


def wait_completed(c, job: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while (status := c.get(f"/v1/jobs/{job}").json())["state"] != "completed":
        assert time.time() < deadline, status
        time.sleep(0.05)
    return status


def test_a_poisoned_record_fails_alone_and_the_next_job_completes(tiny, tmp_path, monkeypatch):
    """Defect 11: a record whose bad field raised something other than ValueError ("max_words": "abc"),
    or any unexpected exception, killed the jobs thread: every later job stayed queued forever while
    /ready said 200, and error rows lacked the record's id."""
    from fastapi.testclient import TestClient

    import service.jobs.worker
    from service.server.app import build_app

    real = service.jobs.worker.run_record

    def flaky(gen, task, record):
        if record.get("id") == "boom":
            raise KeyError("injected failure")
        return real(gen, task, record)

    monkeypatch.setattr(service.jobs.worker, "run_record", flaky)
    poisoned = [
        {"id": "boom", "document": "A fine document."},
        {"id": "abc", "document": "Words here.", "max_words": "abc"},
        {"id": "list", "document": "Words here.", "length": ["short"]},
        {"id": "ok", "document": "The council approved the park.", "length": "short"},
    ]
    with TestClient(build_app(tiny, jobs_db=str(tmp_path / "jobs.sqlite"))) as c:
        body = "".join(json.dumps(r) + "\n" for r in poisoned)
        first = c.post("/v1/jobs?task=summarize", content=body).json()["id"]
        assert wait_completed(c, first)["counts"] == {"total": 4, "succeeded": 1, "failed": 3}
        rows = {r["id"]: r for r in map(json.loads, c.get(f"/v1/jobs/{first}/results").text.splitlines())}
        assert "injected failure" in rows["boom"]["error"] and "max_words" in rows["abc"]["error"]
        assert "length" in rows["list"]["error"] and "summary" in rows["ok"]
        second = c.post("/v1/jobs?task=answer", content=json.dumps({"id": "q", "question": "Who?"}) + "\n")
        assert wait_completed(c, second.json()["id"])["counts"]["succeeded"] == 1
        assert c.get("/ready").status_code == 200


def test_a_full_queue_delays_a_batch_record_instead_of_failing_it(tiny, tmp_path, monkeypatch):
    """Defect 11: an Overloaded from interactive load killed the jobs thread; the record must wait
    its turn (Retry-After) and then succeed."""
    from fastapi.testclient import TestClient

    import service.jobs.worker
    from service.errors import Overloaded
    from service.server.app import build_app

    real, refusals = service.jobs.worker.run_record, []

    def busy_once(gen, task, record):
        if not refusals:
            refusals.append(1)
            raise Overloaded("64 sequences are already waiting", retry_after=1)
        return real(gen, task, record)

    monkeypatch.setattr(service.jobs.worker, "run_record", busy_once)
    with TestClient(build_app(tiny, jobs_db=str(tmp_path / "jobs.sqlite"))) as c:
        job = c.post("/v1/jobs?task=answer", content=json.dumps({"id": "q", "question": "Who?"}) + "\n").json()
        assert wait_completed(c, job["id"])["counts"] == {"total": 1, "succeeded": 1, "failed": 0}
        assert refusals == [1]


def test_nlg_batch_records_any_failure_and_goes_on(tiny, tmp_path):
    """Defect 11, command-line side: a TypeError from a bad field is that record's error row."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        json.dumps({"id": "abc", "document": "Words.", "max_words": "abc"})
        + "\n"
        + json.dumps({"id": "ok", "document": "The council approved the park.", "length": "short"})
        + "\n"
    )
    s = run_job(tiny, "summarize", src, out, workers=2)
    assert (s.succeeded, s.failed) == (1, 1)
    assert lines_of(tmp_path / "out.errors.jsonl")[0]["id"] == "abc"
