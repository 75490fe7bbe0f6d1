"""`nlg bench` on tiny-random: the report has the fields other tools read, and our greedy tokens match
transformers' on the same directory (so tiny-random is a valid Hugging Face checkpoint too)."""

from __future__ import annotations

import json

import pytest
import torch

from service.cli.parser import main

FIELDS = {
    "single_stream_tok_s",
    "hf_single_stream_tok_s",
    "batch8_tok_s",
    "hf_batch8_tok_s",
    "floor_tok_s",
    "ttft_s",
    "load_s",
    "peak_rss_mb",
    "bandwidth_gbs",
    "floor_fraction",
    "prefill_tok_s",
}


def test_bench_json_report(capsys):
    """`nlg bench --json` reports every field, positive, and which kernels ran, and its greedy tokens match
    the reference path."""
    assert main(["bench", "--model", "tiny-random", "--tokens", "8", "--json", "--no-peers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(report) and report["kernels"] in ("torch", "portable", "avx2", "avx512vnni")
    assert report["greedy_tokens_match"] is True
    assert all(report[k] > 0 for k in FIELDS)


@pytest.mark.heavy
def test_bench_tp_sweep_on_tiny_random(capsys):
    """`nlg bench --tp 4` on tiny-random runs tp=1, 2 and 4 in fresh processes and reports each rank."""
    assert main(["bench", "--model", "tiny-random", "--tp", "4", "--tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["tp"] for row in report["rows"]] == [1, 2, 4]
    assert [len(row["rank_peak_rss_mb"]) for row in report["rows"]] == [1, 2, 4]
    assert all(row["tok_s"] > 0 for row in report["rows"])


def test_bench_serve_report(capsys):
    """`nlg bench serve` drives concurrent HTTP clients and reports throughput and latency percentiles."""
    assert main(["bench", "serve", "--model", "tiny-random", "--clients", "4", "--tokens", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fields = {"concurrent_tok_s", "sequential_tok_s", "p50_latency_s", "p99_latency_s", "p99_ttft_s", "clients"}
    assert fields <= set(report) and report["clients"] == 4
    assert all(report[k] > 0 for k in fields)


def test_gpu_bench_report_prints_saved_and_new_results():
    """`nlg bench --device cuda` runs only on a GPU; its printer is checked here on the saved H100
    results and on the same results with the fields added since (launching steps ahead)."""
    from pathlib import Path

    from service.bench.gpu import print_report

    saved = json.loads((Path(__file__).parents[2] / "service/bench/results/gpu-h100.json").read_text())
    text = print_report(saved)
    assert "H100" in text
    assert "smollm2-135m single-stream tok/s >= 1,000: 733 NOT MET" in text
    assert "smollm2-135m batch-32 tok/s >= 20,000: 24,235 met" in text
    assert "llama-1b single-stream share of floor >= 40%: 53% met" in text
    for s in saved["shapes"]:
        s["single_no_overlap_tok_s"], s["single_compiled_no_overlap_tok_s"] = 500.0, 600.0
        s["kernels_per_step_compiled"] = 321
    text = print_report(saved)
    assert "without launching ahead: graphs 500, compiled 600" in text and "610 kernels per eager step, 321" in text


def test_gpu_bench_profiles_the_steps_it_means(tiny):
    """The steps `nlg bench --device cuda` profiles (eager forward; the recorded step outside its graph)
    run as given on any device: one token's logits for one row."""
    from service.bench.gpu import compiled_step, eager_step
    from service.engine.core import Engine
    from service.engine.sampling_params import SamplingParams

    engine = Engine(tiny.engine.model, graphs=True)
    engine.generate([[5, 6, 7]], [SamplingParams(max_tokens=3)])
    with torch.inference_mode():
        assert eager_step(engine)().shape == (1, tiny.engine.model.config.vocab_size)
        logits, tokens = compiled_step(engine)()
    assert logits.shape == (1, tiny.engine.model.config.vocab_size) and tokens.shape == (1,)
