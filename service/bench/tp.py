"""`nlg bench --tp N`: the same model at every valid tensor-parallel size up to N, each in fresh
processes: per-rank peak RSS after loading (each rank reads only its slices) and decode tokens/s.

On a 2-core CPU more ranks cannot be faster: they share the same cores and memory bandwidth, so the
tokens/s column shows what the collectives cost per step. The memory column is the point.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from model.loader import load_model, read_config
from model.ranks import Leader, follow
from model.registry import resolve
from parallel.launch import init_from_env, launch, shutdown
from parallel.state import get_tp
from parallel.weights import SafetensorsReader
from service.bench.cpu import peak_rss_mb
from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams


def rank_bench(directory: str, tokens: int) -> dict | None:
    """Runs on every rank of one size; rank 0 returns the row."""
    before = peak_rss_mb()
    device = init_from_env()
    start = time.perf_counter()
    model = load_model(directory, device=device)
    load_s = time.perf_counter() - start
    rss = [peak_rss_mb()]
    tp = get_tp()
    if tp.size > 1:
        everyone: list = [None] * tp.size
        dist.all_gather_object(everyone, rss[0])
        rss = everyone
    try:
        if tp.rank != 0:
            follow(model, device)
            return None
        engine = Engine(Leader(model) if tp.size > 1 else model)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, model.config.vocab_size, (16,), generator=g).tolist()
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        engine.generate([prompt], [SamplingParams(max_tokens=2, ignore_eos=True)])  # warm-up
        t = time.perf_counter()
        engine.generate([prompt], [params])
        decode_s = time.perf_counter() - t
        return {
            "tp": tp.size,
            "threads_per_rank": torch.get_num_threads(),
            "load_s": load_s,
            "rss_before_load_mb": before,
            "rank_peak_rss_mb": rss,
            "tok_s": tokens / decode_s,
        }
    finally:
        shutdown()


def run_sweep(model: str, max_tp: int, tokens: int = 32) -> dict:
    directory = resolve(model)
    cfg = read_config(directory)
    sizes = [tp for tp in cfg.tp_sizes() if tp <= max_tp]
    rows = [launch(tp, rank_bench, str(directory), tokens) for tp in sizes]
    base, imports = max(rows[0]["rank_peak_rss_mb"]), rows[0]["rss_before_load_mb"]
    for row in rows:
        row["peak_rss_vs_tp1"] = max(row["rank_peak_rss_mb"]) / base
        weights = base - imports  # under a megabyte for tiny models: no meaningful ratio
        row["weights_rss_vs_tp1"] = (max(row["rank_peak_rss_mb"]) - imports) / weights if weights >= 1 else None
    return {"model": model, "params": checkpoint_params(directory), "tokens": tokens, "rows": rows}


def checkpoint_params(directory) -> int:
    reader = SafetensorsReader(directory)
    try:
        return sum(math.prod(reader.get_slice(k).get_shape()) for k in reader.keys())
    finally:
        reader.close()


def print_sweep(r: dict) -> str:
    lines = [
        f"model {r['model']} ({r['params'] / 1e6:.0f}M parameters), {r['tokens']} tokens single-stream",
        f"{'tp':>3} {'threads/rank':>12} {'load s':>7} {'peak RSS per rank (MB)':>28} {'vs tp=1':>8} "
        f"{'weights part vs tp=1':>21} {'tok/s':>7}",
    ]
    for row in r["rows"]:
        ranks = " ".join(f"{m:.0f}" for m in row["rank_peak_rss_mb"])
        lines.append(
            f"{row['tp']:>3} {row['threads_per_rank']:>12} {row['load_s']:>7.2f} {ranks:>28} "
            f"{row['peak_rss_vs_tp1']:>8.2f} {_ratio(row['weights_rss_vs_tp1']):>21} {row['tok_s']:>7.1f}"
        )
    lines.append(f"(RSS before loading, imports only: {r['rows'][0]['rss_before_load_mb']:.0f} MB per process)")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
