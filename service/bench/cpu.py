"""`nlg bench`: our engine against `transformers` `generate()` on the same weights, same prompts,
greedy, in the same run, so the ratios hold on a noisy machine. Also measures this machine's memory
read bandwidth, and from it the floor a decode step cannot beat: every step reads all weights.

Other engines installed (the `bench` extra; `service.bench.peers`) run the same prompts in the same run,
greedy, on the same weights: llama.cpp on the named GGUF model's file, made F32 for the unquantized model
(also the same prefill prompt); CTranslate2 and ONNX Runtime GenAI in fp32."""

from __future__ import annotations

import resource
import time
from collections import Counter
from pathlib import Path

import torch

from model.loader import pick_quantization
from model.registry import GGUF_MODELS, fetch_gguf, resolve
from parallel import quant
from parallel.quant import weight_bytes
from service.engine.generator import TextGenerator
from service.engine.sampling_params import SamplingParams
from service.engine.scheduler import PROMPT_LOOKUP

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Summarize the main causes of the French Revolution in a few sentences.",
    "Photosynthesis is the process by which green plants",
    "Write a short note to a colleague about moving tomorrow's meeting.",
    "The three largest cities in Canada are",
    "Explain how a refrigerator keeps food cold.",
    "In 1969, the Apollo 11 mission",
    "A good summary of a news article should",
]


PEER_LABELS = {
    "llama_cpp": "llama.cpp on the GGUF file",
    "ctranslate2": "CTranslate2 fp32",
    "onnxruntime_genai": "ONNX Runtime GenAI fp32",
}


def read_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Best-of-`reps` read bandwidth of a sum over a buffer far larger than the caches."""
    x = torch.ones(mb * 1024 * 1024 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


PREFILL = 512  # prompt tokens of the prefill measurement (fewer where the context is shorter)


def prefill_prompt(prompts: list[list[int]], context: int) -> list[int]:
    """PREFILL tokens (fewer where `context` is shorter) of the prompts, repeated, with a prefix no prompt's
    cached blocks share."""
    return (prompts[3][2:] + sum(prompts, []) * PREFILL)[: min(PREFILL, context - 1)]


def ours(gen: TextGenerator, prompts: list[list[int]], tokens: int) -> dict:
    """Our decode step (prompt lookup off), a PREFILL-token prompt's prefill, then single-stream again with
    prompt-lookup speculation."""
    params, engine = SamplingParams(max_tokens=tokens, ignore_eos=True), gen.engine
    lookup, engine.config.prompt_lookup = engine.config.prompt_lookup, 0
    engine.generate([prompts[0]], [params])  # warm-up
    first: list[float] = []
    start = time.perf_counter()
    out = engine.generate([prompts[0]], [params], on_token=lambda i, t: first.append(time.perf_counter()) and False)
    end = time.perf_counter()
    ttft = first[0] - start
    start = time.perf_counter()
    engine.generate(prompts, [params] * len(prompts))
    batch_s = time.perf_counter() - start
    long = prefill_prompt(prompts, engine.context)
    start = time.perf_counter()
    engine.generate([long], [SamplingParams(max_tokens=1)])
    prefill_s = time.perf_counter() - start
    engine.config.prompt_lookup = lookup or PROMPT_LOOKUP
    stamps: list[float] = []
    spec = engine.generate([prompts[0]], [params], on_token=lambda i, t: stamps.append(time.perf_counter()) and False)
    engine.config.prompt_lookup = lookup
    return {
        "ttft_s": ttft,
        "single_stream_tok_s": (tokens - 1) / (end - first[0]),
        "batch8_tok_s": len(prompts) * tokens / batch_s,
        "prefill_tokens": len(long),
        "prefill_tok_s": len(long) / prefill_s,
        "lookup_single_stream_tok_s": (tokens - 1) / (stamps[-1] - stamps[0]),
        "lookup_tokens_match": spec[0].token_ids == out[0].token_ids,
        "tokens": out[0].token_ids,
    }


@torch.inference_mode()
def hf(directory, prompts: list[list[int]], tokens: int, pad_id: int) -> dict:
    from model.loader import transformers_model

    start = time.perf_counter()
    model = transformers_model(directory)
    load_s = time.perf_counter() - start

    def run(batch: list[list[int]], n: int) -> tuple[float, torch.Tensor]:
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        t = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id
        )
        return time.perf_counter() - t, out[:, width:]

    run([prompts[0]], 2)  # warm-up
    ttft, _ = run([prompts[0]], 1)
    total, out = run([prompts[0]], tokens)
    batch_s, _ = run(prompts, tokens)
    return {
        "hf_load_s": load_s,
        "hf_ttft_s": ttft,
        "hf_single_stream_tok_s": (tokens - 1) / (total - ttft),
        "hf_batch8_tok_s": len(prompts) * tokens / batch_s,
        "tokens": out[0].tolist(),
    }


def run(
    model: str, tokens: int = 64, with_hf: bool = True, quantization: str = "none", with_peers: bool = True
) -> dict:
    bandwidth = read_bandwidth_gbs()
    if quantization == "auto":
        quantization = pick_quantization(resolve(model))
    gen = TextGenerator.load(model, quantization=quantization)
    rss = peak_rss_mb()
    prompts = [gen.tokenizer.encode(p) for p in PROMPTS]
    wbytes = weight_bytes(gen.engine.model)
    directory, pad_id = gen.directory, min(gen.tokenizer.stop_ids, default=0)
    r = {
        "model": model,
        "quantization": quantization,
        "threads": torch.get_num_threads(),
        "kernels": quant.native() or "torch",
        "fp32_routes": dict(Counter(gen.engine.model.matmul_routes.values())),  # shapes per route
        "load_s": gen.load_s,
        "peak_rss_mb": rss,
        "weights_mb": wbytes / 1e6,
        "bandwidth_gbs": bandwidth,
        "floor_tok_s": bandwidth * 1e9 / wbytes,
        "tokens_per_sequence": tokens,
    }
    mine = ours(gen, prompts, tokens)
    r |= {k: v for k, v in mine.items() if k != "tokens"}
    r["floor_fraction"] = r["single_stream_tok_s"] / r["floor_tok_s"]
    if quantization != "none":  # the unquantized model in the same run, loaded after the RSS was read
        del gen
        base = ours(TextGenerator.load(model), prompts, tokens)
        r |= {f"baseline_{k}": v for k, v in base.items() if k != "tokens"}
        r["baseline_tokens_match"] = mine["tokens"] == base["tokens"]
        r["single_stream_x_baseline"] = r["single_stream_tok_s"] / base["single_stream_tok_s"]
        r["batch8_x_baseline"] = r["batch8_tok_s"] / base["batch8_tok_s"]
    prefill = prefill_prompt(prompts, r["prefill_tokens"] + 1)  # the prompt our prefill ran
    for name, theirs in _peers(model, directory, quantization, prompts, tokens, prefill) if with_peers else []:
        r |= {f"{name}_{k}": v for k, v in theirs.items() if k != "tokens"}
        for k in ("single_stream_tok_s", "batch8_tok_s", "prefill_tok_s"):
            if k in theirs:
                r[f"{k.removesuffix('_tok_s')}_x_{name}"] = r[k] / theirs[k]
        r[f"{name}_tokens_agree"] = next(
            (i for i, (a, b) in enumerate(zip(mine["tokens"], theirs["tokens"])) if a != b), tokens
        )
    if with_hf:
        theirs = hf(directory, prompts, tokens, pad_id=pad_id)
        r |= {k: v for k, v in theirs.items() if k != "tokens"}
        r["greedy_tokens_match"] = mine["tokens"] == theirs["tokens"]
        r["single_stream_x_hf"] = r["single_stream_tok_s"] / r["hf_single_stream_tok_s"]
        r["batch8_x_hf"] = r["batch8_tok_s"] / r["hf_batch8_tok_s"]
    return r


def _peers(model: str, directory, quantization: str, prompts: list[list[int]], tokens: int, prefill: list[int]):
    """(name, report) of each peer engine installed (`service.bench.peers`): llama.cpp on the GGUF file, the
    named model's or the one given (F32 when unquantized, else the file as it is; also the `prefill` prompt);
    unquantized, CTranslate2 and ONNX Runtime GenAI on the same fp32 weights."""
    from service.bench import peers

    have = peers.installed()
    path = fetch_gguf(model) if model in GGUF_MODELS else Path(model) if str(model).endswith(".gguf") else None
    if "llama_cpp" in have and path is not None:
        yield (
            "llama_cpp",
            peers.llama_cpp(peers.f32_gguf(path) if quantization == "none" else path, prompts, tokens, prefill),
        )
    if quantization != "none":
        return
    for name in ("ctranslate2", "onnxruntime_genai"):
        if name in have:
            yield name, getattr(peers, name)(peers.hf_export(directory, Path(directory).name), prompts, tokens)


def print_report(r: dict) -> str:
    lines = [
        f"model {r['model']}, {r['quantization']}  ({r['weights_mb']:.0f} MB of weights, {r['threads']} threads, "
        f"{r['tokens_per_sequence']} tokens per sequence; quantized matmuls: "
        + (f"our kernels, {r['kernels']}" if r["kernels"] != "torch" else "torch's kernels")
        + "".join(f"; fp32 matmuls of {n} shapes: {route}" for route, n in r.get("fp32_routes", {}).items())
        + ")",
        f"memory read bandwidth {r['bandwidth_gbs']:.1f} GB/s -> floor {r['floor_tok_s']:.1f} tok/s single-stream",
        f"load {r['load_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB, time to first token {r['ttft_s'] * 1e3:.0f} ms",
        f"single-stream {r['single_stream_tok_s']:.1f} tok/s ({100 * r['floor_fraction']:.0f}% of floor)",
        f"batch-8       {r['batch8_tok_s']:.1f} tok/s",
        f"prefill of {r['prefill_tokens']} tokens {r['prefill_tok_s']:.1f} tok/s",
        f"single-stream with prompt lookup {r['lookup_single_stream_tok_s']:.1f} tok/s (these prompts copy little: "
        f"the SQuAD and CNN/DM figures are in the README), greedy tokens "
        f"{'match' if r['lookup_tokens_match'] else 'DIFFER'}",
    ]
    if "baseline_single_stream_tok_s" in r:
        lines.append(
            f"unquantized, same run: single-stream {r['baseline_single_stream_tok_s']:.1f} tok/s "
            f"(x{r['single_stream_x_baseline']:.2f}), batch-8 {r['baseline_batch8_tok_s']:.1f} tok/s "
            f"(x{r['batch8_x_baseline']:.2f}), prefill {r['baseline_prefill_tok_s']:.1f} tok/s, "
            f"greedy tokens {'match' if r['baseline_tokens_match'] else 'differ'}"
        )
    for name, label in PEER_LABELS.items():
        if f"{name}_single_stream_tok_s" in r:
            batch, prefill = f"{name}_batch8_tok_s", f"{name}_prefill_tok_s"
            lines.append(
                f"{label}, same run: single-stream {r[f'{name}_single_stream_tok_s']:.1f} tok/s "
                f"(ours x{r[f'single_stream_x_{name}']:.2f})"
                + (f", batch-8 {r[batch]:.1f} tok/s (ours x{r[f'batch8_x_{name}']:.2f})" if batch in r else "")
                + (f", prefill {r[prefill]:.1f} tok/s (ours x{r[f'prefill_x_{name}']:.2f})" if prefill in r else "")
                + f", greedy tokens agree for {r[f'{name}_tokens_agree']}"
            )
    if "hf_single_stream_tok_s" in r:
        lines += [
            f"transformers generate(): single-stream {r['hf_single_stream_tok_s']:.1f} tok/s, "
            f"batch-8 {r['hf_batch8_tok_s']:.1f} tok/s, ttft {r['hf_ttft_s'] * 1e3:.0f} ms, "
            f"load {r['hf_load_s']:.2f} s",
            f"ours / transformers: single-stream x{r['single_stream_x_hf']:.2f}, batch-8 x{r['batch8_x_hf']:.2f}, "
            f"greedy tokens {'match' if r['greedy_tokens_match'] else 'DIFFER'}",
        ]
    return "\n".join(lines)
