"""`nlg bench serve`: C concurrent streaming clients against a live server, and the same requests one
at a time, in one run: aggregate generated tokens/s, p50/p99 latency, p99 time to first token."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx

from parallel.launch import free_port
from service.bench.cpu import PROMPTS


def one_request(url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, usage = None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if ttft is None and '"content": "' in line and '"content": ""' not in line:
                ttft = time.perf_counter() - start
            if '"usage"' in line:
                usage = httpx.Response(200, content=line[6:]).json()["usage"]
    return {"latency_s": time.perf_counter() - start, "ttft_s": ttft or 0.0, "tokens": usage["completion_tokens"]}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@contextmanager
def server_process(model: str, slots: int, extra: list[str], port: int | None = None):
    """`nlg serve` in its own process (its own interpreter: the clients here do not compete with it for
    the GIL), on `port` (default a free one); yields its base URL once /ready answers 200."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--max-waiting",
        str(4 * slots),
        "--jobs-db",
        ":memory:",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nlg serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("nlg serve did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def run(model: str, clients: int = 16, tokens: int = 64, extra: list[str] = ()) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    with server_process(model, clients, list(extra)) as url:
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        one_request(url, served, prompts[0], 4)  # warm-up
        start = time.perf_counter()
        sequential = [one_request(url, served, p, tokens) for p in prompts]
        sequential_s = time.perf_counter() - start
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            concurrent = list(pool.map(lambda p: one_request(url, served, p, tokens), prompts))
        concurrent_s = time.perf_counter() - start
    latency = [r["latency_s"] for r in concurrent]
    ttft = [r["ttft_s"] for r in concurrent]
    report = {
        "model": model,
        "clients": clients,
        "tokens_per_request": tokens,
        "concurrent_tok_s": sum(r["tokens"] for r in concurrent) / concurrent_s,
        "sequential_tok_s": sum(r["tokens"] for r in sequential) / sequential_s,
        "p50_latency_s": percentile(latency, 50),
        "p99_latency_s": percentile(latency, 99),
        "p50_ttft_s": percentile(ttft, 50),
        "p99_ttft_s": percentile(ttft, 99),
        "sequential_p50_ttft_s": percentile([r["ttft_s"] for r in sequential], 50),
    }
    report["speedup"] = report["concurrent_tok_s"] / report["sequential_tok_s"]
    return report


def print_report(r: dict) -> str:
    return "\n".join(
        [
            f"model {r['model']}: {r['clients']} requests of {r['tokens_per_request']} tokens (streaming chat)",
            f"one at a time : {r['sequential_tok_s']:.1f} tok/s, ttft p50 {r['sequential_p50_ttft_s'] * 1e3:.0f} ms",
            f"{r['clients']} concurrent : {r['concurrent_tok_s']:.1f} tok/s (x{r['speedup']:.2f}), latency p50 "
            f"{r['p50_latency_s']:.2f} s p99 {r['p99_latency_s']:.2f} s, ttft p50 {r['p50_ttft_s'] * 1e3:.0f} ms "
            f"p99 {r['p99_ttft_s'] * 1e3:.0f} ms",
        ]
    )
