"""`make soak`: N clients for M minutes against a live `nlg serve` whose queue bound they exceed, mixing
plain and streaming completions, chat, answers and summaries, answers scored with `evaluate`, uploaded
documents (.docx, .txt) and batch jobs, with bad requests and clients that hang up mid-stream among them.
Counts every status, the responses lost (a reset, a 200 stream without [DONE], a completed job whose
records do not all come back; jobs still running 5 minutes after the load are counted apart) and the
incoherent ones (a 200 without its fields, an error event in a stream for anything but a deadline),
whether the server died, and its RSS over time (per minute in the report; with its children's, the
document converters' among them, beside it).
Clients honour Retry-After (at most 2 s). Not a test: a report.

    python -m service.bench.soak --clients 24 --minutes 3 [--model tiny-random] [--slots 4 --max-waiting 8]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil

from parallel.launch import free_port

REQUESTS = [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 48}),
    ("/v1/completions", {"prompt": "The report said", "max_tokens": 64, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 32}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me."}], "max_tokens": 48, "stream": True}),
    ("/v1/answer", {"question": "Who built the park?", "passages": ["The council built the park in May."]}),
    ("/v1/summarize", {"document": "The council approved the park. Work starts in May. " * 8, "stream": True}),
    ("/v1/completions", {"prompt": [999999999], "max_tokens": 4}),  # bad: out of the vocabulary
    ("/v1/completions", {"prompt": "x", "temperature": 1e-300, "max_tokens": 4}),  # tiny temperature: greedy
    ("/v1/completions", {"prompt": "x", "seed": 10**30}),  # bad: seed beyond int64
    (
        "/v1/answer",
        {
            "question": "Who?",
            "passages": ["Ann did."],
            "evaluate": {"metrics": ["rouge", "qa", "support"], "references": ["Ann did it."] * 4},
        },
    ),
    ("upload", {}),  # a document to /v1/summarize as multipart
    ("job", {}),  # a batch job of three records, checked at the end
]
JOB = "".join(json.dumps({"id": i, "question": "Who?", "passages": ["Bo did."]}) + "\n" for i in range(3))


def documents() -> list[tuple[str, bytes]]:
    """The files the clients upload: a small .docx (python-docx, where installed) and a text file."""
    files = [("notes.txt", b"The council approved the park. Work starts in May.\n" * 20)]
    try:
        import io

        from docx import Document

        d = Document()
        d.add_heading("Park", 1)
        d.add_paragraph("The council approved the park. Work starts in May.")
        out = io.BytesIO()
        d.save(out)
        files.append(("park.docx", out.getvalue()))
    except ImportError:
        pass
    return files


DOCUMENTS = documents()


def one(client: httpx.Client, url: str, model: str, rng: random.Random, counts: collections.Counter, jobs: list):
    path, body = rng.choice(REQUESTS)
    body = ({"model": model} if "/v1/c" in path else {}) | body
    hang_up = body.get("stream") and rng.random() < 0.2
    try:
        if path == "upload":
            r = client.post(f"{url}/v1/summarize", files={"files": rng.choice(DOCUMENTS)})
            counts[r.status_code] += 1
            back_off(r, rng)
            if r.status_code == 200 and "summary" not in r.json():
                counts["incoherent"] += 1
            return
        if path == "job":
            r = client.post(f"{url}/v1/jobs?task=answer", content=JOB)
            counts[r.status_code] += 1
            if r.status_code == 200:
                jobs.append(r.json()["id"])
            return
        if not body.get("stream"):
            r = client.post(f"{url}{path}", json=body)
            counts[r.status_code] += 1
            back_off(r, rng)
            if r.status_code == 200 and not ({"choices", "answer", "summary"} & set(r.json())):
                counts["incoherent"] += 1
            return
        with client.stream("POST", f"{url}{path}", json=body) as r:
            counts[r.status_code] += 1
            back_off(r, rng)
            if r.status_code != 200:
                return
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if hang_up and len(events) == 2:
                        counts["hung up"] += 1
                        return
            if not events or events[-1] != "[DONE]":
                counts["lost"] += 1
            elif any('"error"' in e and '"timeout"' not in e for e in events):
                counts["incoherent"] += 1
    except httpx.TransportError as e:
        counts["lost"] += 1
        counts[f"transport: {type(e).__name__}"] += 1


def back_off(r: httpx.Response, rng: random.Random) -> None:
    """A 429 client waits as told (a well-behaved client; at most 2 s, jittered) before its next request."""
    if r.status_code == 429:
        time.sleep(min(2.0, float(r.headers.get("retry-after", 1))) * rng.uniform(0.5, 1.0))


def jobs_left(url: str, jobs: list[str], wait_s: float = 300) -> tuple[int, int]:
    """After the load, given `wait_s` to finish: (jobs completed with a record missing from their results:
    lost, jobs not completed: still behind, as batch work runs after interactive requests)."""
    end, lost, behind = time.time() + wait_s, 0, 0
    for job in jobs:
        while (state := httpx.get(f"{url}/v1/jobs/{job}", timeout=30).json()["state"]) != "completed":
            if time.time() >= end:
                break
            time.sleep(0.5)
        if state != "completed":
            behind += 1
        elif len(httpx.get(f"{url}/v1/jobs/{job}/results", timeout=30).text.splitlines()) != 3:
            lost += 1
    return lost, behind


def rss_mb(proc: psutil.Process) -> tuple[float, float]:
    """(the server process's RSS, with its children's: ranks, the document converters' forkserver and children)."""
    tree = [proc, *proc.children(recursive=True)]
    own = proc.memory_info().rss
    return own / 2**20, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--max-waiting", type=int, default=8)
    args = p.parse_args(argv)
    port, log = free_port(), tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--slots", str(args.slots), "--max-waiting", str(args.max_waiting), "--jobs-db", ":memory:"]
    server = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    while not _ready(url):
        if server.poll() is not None:
            print(open(log.name).read()[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.3)
    proc = psutil.Process(server.pid)
    counts: collections.Counter = collections.Counter()
    jobs: list[str] = []
    rss = [(0.0, rss_mb(proc))]
    end, start = time.time() + 60 * args.minutes, time.time()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as c:
            for _ in itertools.count():
                if time.time() > end or server.poll() is not None:
                    return
                one(c, url, args.model, rng, counts, jobs)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        if server.poll() is None:
            rss.append((time.time() - start, rss_mb(proc)))
    died = server.poll() is not None
    lost_jobs, jobs_behind = jobs_left(url, jobs) if not died else (len(jobs), 0)
    alive_after = not died and _ready(url)
    server.terminate()
    server.wait(60)
    total = (
        sum(v for k, v in counts.items() if isinstance(k, int))
        + counts["lost"]
        - sum(v for k, v in counts.items() if str(k).startswith("transport"))
    )
    report = {
        "clients": args.clients,
        "minutes": args.minutes,
        "slots": args.slots,
        "max_waiting": args.max_waiting,
        "requests": total,
        "statuses": {str(k): v for k, v in sorted(counts.items(), key=str) if isinstance(k, int)},
        "hung_up": counts["hung up"],
        "jobs": len(jobs),
        "jobs_lost": lost_jobs,
        "jobs_not_finished_5_min_after": jobs_behind,
        "lost": counts["lost"],
        "incoherent": counts["incoherent"],
        "deaths": int(died),
        "ready_after": alive_after,
        "rss_mb_start": round(rss[0][1][0], 1),
        "rss_mb_peak": round(max(v[0] for _, v in rss), 1),
        "rss_mb_end": round(rss[-1][1][0], 1),
        "rss_mb_per_minute": [round(v[0]) for t, v in rss if t == 0 or int(t / 60) != int((t - 5) / 60)],
        "rss_mb_with_children_start_peak_end": [
            round(rss[0][1][1]),
            round(max(v[1] for _, v in rss)),
            round(rss[-1][1][1]),
        ],
        "transport_errors": {k: v for k, v in counts.items() if str(k).startswith("transport")},
        "server_log": log.name,
    }
    print(json.dumps(report, indent=2))
    ok = not died and not counts["lost"] and not lost_jobs and not counts["incoherent"] and alive_after
    return 0 if ok else 1


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=30).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
