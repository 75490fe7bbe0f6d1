"""`nlg bench replicas`: `nlg serve --ray` on a local Ray cluster, in one run.

- Routing: 20 questions over 4 passages (5 each, interleaved in a seeded order, one at a time) to 2 replicas, routed by
  prefix and then round robin: the prefix-cache hit rate (prompt tokens found in the cache, summed over the
  replicas' /metrics) and the mean time to first token.
- Throughput: `clients` concurrent streaming clients against 1 replica and 2 (the cluster's cores split
  between them).
- The ingress's cost: the mean latency of one-token requests, one at a time, through Ray Serve with one
  replica and from a plain `nlg serve`.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from service.bench.cpu import PROMPTS
from service.bench.serve import one_request, server_process

QUESTIONS = 5


def passages(n: int = 4) -> list[str]:
    """`n` passages of about 400 tokens, each its own."""
    return [
        " ".join(
            f"Record {k} of survey {p}: the dam on river {p}-{k} was finished in {1900 + 7 * k + p}." for k in range(40)
        )
        for p in range(n)
    ]


def asked(passages: int) -> list[tuple[int, int]]:
    """(question, passage) in the order asked: `QUESTIONS` rounds over the passages, each round in its own
    seeded order (in one fixed order, round robin over 2 replicas would send each passage to one replica
    by accident)."""
    rng = random.Random(0)
    return [(q, n) for q in range(QUESTIONS) for n in rng.sample(range(passages), passages)]


def cached(url: str) -> tuple[float, float]:
    """(prompt tokens looked up in the prefix cache, found there), summed over the replicas."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def total(name: str) -> float:
        match = re.search(rf'^vllm:{name}_total{{[^}}]*replica="all"[^}}]*}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return total("prefix_cache_queries"), total("prefix_cache_hits")


def ready(url: str, replicas: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/ready", timeout=30).json().get("replicas") != replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{replicas} replicas did not become ready")
        time.sleep(0.5)


def ray_server(model: str, replicas: int, routing: str, slots: int):
    from service.server.cluster import free_serve_port

    extra = ["--ray", "--replicas", str(replicas), "--routing", routing]
    return server_process(model, slots, extra, free_serve_port())


def routing(model: str, how: str) -> dict:
    texts = passages()
    with ray_server(model, 2, how, 4) as url:
        ready(url, 2)
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        before = cached(url)
        ttft = []
        for q, n in asked(len(texts)):
            prompt = f"{texts[n]}\n\nQuestion {q}: when was dam {n}-{q} finished?"
            ttft.append(one_request(url, served, prompt, 8)["ttft_s"])
        after = cached(url)
    queries, hits = after[0] - before[0], after[1] - before[1]
    return {"hit_rate": hits / queries if queries else 0.0, "mean_ttft_s": statistics.mean(ttft)}


def throughput(model: str, replicas: int, clients: int, tokens: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(clients)]
    with ray_server(model, replicas, "prefix", clients) as url:
        ready(url, replicas)
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        one_request(url, served, prompts[0], 4)
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(lambda p: one_request(url, served, p, tokens), prompts))
        return sum(r["tokens"] for r in done) / (time.perf_counter() - start)


def latency(url: str, n: int = 30) -> float:
    served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    one_request(url, served, "Hello.", 1)
    return statistics.mean(one_request(url, served, "Hello.", 1)["latency_s"] for _ in range(n))


def run(model: str, clients: int = 16, tokens: int = 64) -> dict:
    report = {"model": model, "clients": clients, "tokens_per_request": tokens}
    report["prefix"], report["round_robin"] = routing(model, "prefix"), routing(model, "round-robin")
    report["tok_s"] = {str(r): throughput(model, r, clients, tokens) for r in (1, 2)}
    with ray_server(model, 1, "prefix", 4) as url:
        ready(url, 1)
        through_ray = latency(url)
    with server_process(model, 4, []) as url:
        plain = latency(url)
    report["latency_ms"] = {"ingress": through_ray * 1e3, "plain": plain * 1e3}
    return report


def print_report(r: dict) -> str:
    p, rr, tok, lat = r["prefix"], r["round_robin"], r["tok_s"], r["latency_ms"]
    return "\n".join(
        [
            f"model {r['model']}, nlg serve --ray on a local cluster",
            f"20 questions over 4 passages, 2 replicas: prefix routing {p['hit_rate']:.0%} of prompt tokens cached, "
            f"mean ttft {p['mean_ttft_s'] * 1e3:.0f} ms; round robin {rr['hit_rate']:.0%}, "
            f"{rr['mean_ttft_s'] * 1e3:.0f} ms ({rr['mean_ttft_s'] / p['mean_ttft_s']:.2f}x)",
            f"{r['clients']} clients x {r['tokens_per_request']} tokens: 1 replica {tok['1']:.1f} tok/s, 2 replicas "
            f"{tok['2']:.1f} tok/s ({tok['2'] / tok['1']:.2f}x)",
            f"one-token requests one at a time: through the ingress {lat['ingress']:.0f} ms, plain nlg serve "
            f"{lat['plain']:.0f} ms (+{lat['ingress'] - lat['plain']:.0f} ms per request)",
        ]
    )
