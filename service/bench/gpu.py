"""`nlg bench --device cuda`: the GPU fast path against `transformers` `generate()` on the same weights,
in the same run, for named shapes with random weights (the real checkpoints need not travel to the GPU
machine). Per shape: the card's copy bandwidth and the floor it sets (every decode step reads every
weight once), our single-stream and batch-32 decode tokens/s with CUDA graphs (compiled or not) and
without, single-stream also without launching steps ahead of the host, and `generate()`'s. First a
correctness check on the tiny model: greedy tokens on CUDA against the CPU's fp32 path. Needs only
torch, transformers, safetensors and tokenizers (no HTTP layer).

Decode tokens/s counts the tokens after each sequence's first, over the time from the first token to
the last: the prompt's prefill is not in it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from model.config import PRESETS
from model.loader import load_model
from model.registry import resolve
from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams

SHAPES = ("smollm2-135m", "llama-1b")
PROMPT_LEN = 16


def copy_bandwidth_gbs(device: torch.device, mb: int = 1024, reps: int = 10) -> float:
    """Device-to-device copy, bytes read plus bytes written, best of `reps`."""
    x = torch.empty(mb * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / best / 1e9


def random_checkpoint(shape: str, directory: Path, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A `transformers` model of the named shape with its default random initialisation, on the GPU;
    saved to `directory` so that our loader reads the same weights."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**PRESETS[shape].to_hf())
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    return model.eval()


def decode_rate(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s of one `generate` call over `prompts`, and the first sequence's tokens."""
    params = [SamplingParams(max_tokens=tokens, ignore_eos=True)] * len(prompts)
    engine.generate(prompts, params)  # warm-up (and graph capture)
    stamps: list[float] = []
    torch.cuda.synchronize()
    out = engine.generate(prompts, params, on_token=lambda i, t: stamps.append(time.perf_counter()) and False)
    return (len(stamps) - len(prompts)) / (stamps[-1] - stamps[len(prompts) - 1]), out[0].token_ids


@torch.inference_mode()
def hf_rate(model, prompts: list[list[int]], tokens: int) -> tuple[float, list[int]]:
    """`generate()`'s decode tokens/s: the time of `tokens` new tokens less the time of one."""
    ids = torch.tensor(prompts, device="cuda")  # prompts of equal length: no padding

    def timed(n: int):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out[:, ids.shape[1] :]

    timed(2)  # warm-up
    first, _ = timed(1)
    total, out = timed(tokens)
    return len(prompts) * (tokens - 1) / (total - first), out[0].tolist()


def step_ms(engine: Engine, rows: int) -> float:
    """GPU time of one replay of the decode graph of `rows` rows (no host work), median of 50."""
    graphs = engine.runner.graphs
    graph, _ = next(g for (b, _), g in graphs.runner.graphs.items() if b == rows)
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile_kernels(step) -> tuple[int, str]:
    """The kernels `step()` launches (run once before, so no warm-up or compile is in it): how many,
    and the profiler's table of them."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), prof.key_averages().table(sort_by="device_time_total", row_limit=25)


def eager_step(engine: Engine):
    """One eager decode step of one sequence: the forward a graph records."""
    cache = engine.runner.new_cache(1, 256)
    zeros = torch.zeros(1, 1, dtype=torch.long, device=engine.runner.device)
    blocks = torch.zeros(1, 256 // cache.block_size, dtype=torch.long, device=engine.runner.device)  # the null block
    return lambda: engine.model(zeros, zeros, cache, blocks, logits_index=zeros[0], fixed=True)


def compiled_step(engine: Engine):
    """One compiled decode step of one row, outside its graph (after the runs: the row's table is the
    null block's)."""
    decoder = engine.runner.graphs
    inputs, tables = decoder._inputs(1)
    tables.zero_()
    return lambda: decoder.step(decoder.model, inputs, tables, decoder.cache, 256)


def check_tiny(tokens: int = 32) -> dict:
    """Greedy tokens of the tiny model: CUDA fp32 with graphs must equal the CPU's fp32 path exactly;
    CUDA bf16 with graphs is reported as the first-step logits' error and the agreeing prefix."""
    path = resolve("tiny-random")
    prompt = [[5, 17, 42, 99, 3, 250, 7, 8, 11, 64, 65, 66]]
    params = [SamplingParams(max_tokens=tokens, ignore_eos=True)]
    cpu = load_model(path)
    want = Engine(cpu).generate(prompt, params)[0].token_ids
    r = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gpu = load_model(path, dtype=dtype, device="cuda")
        got = Engine(gpu, device="cuda").generate(prompt, params)[0].token_ids
        agree = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        with torch.inference_mode():
            ids = torch.tensor(prompt)
            positions = torch.arange(ids.shape[1])[None]
            ref = cpu(ids, positions)
            err = (gpu(ids.cuda(), positions.cuda()).float().cpu() - ref).abs().max() / ref.abs().max()
        r[name] = {"tokens_agree": agree, "of": len(want), "relative_logit_error": float(err)}
    r["fp32_exact"] = r["fp32"]["tokens_agree"] == len(want)
    return r


def compiled_rates(model, prompts: list[list[int]], tokens: int, batch: int) -> dict:
    engine = Engine(model, max_batch=batch, device="cuda", compile=True)
    start = time.perf_counter()
    r = {}
    r["single_compiled_tok_s"], r["tokens"] = decode_rate(engine, prompts[:1], tokens)
    r["graph_step_ms_rows1_compiled"] = step_ms(engine, 1)
    engine.config.launch_ahead = False
    r["single_compiled_no_overlap_tok_s"], _ = decode_rate(engine, prompts[:1], tokens)
    engine.config.launch_ahead = True
    r[f"batch{batch}_compiled_tok_s"], _ = decode_rate(engine, prompts, tokens)
    r[f"graph_step_ms_rows{batch}_compiled"] = step_ms(engine, batch)
    r["compile_and_capture_s"] = time.perf_counter() - start
    try:
        r["kernels_per_step_compiled"], r["kernel_table_compiled"] = profile_kernels(compiled_step(engine))
    except Exception as e:  # the rates above are worth keeping without it
        r["kernel_profile_compiled_error"] = f"{type(e).__name__}: {e}"[:2000]
    return r


def bench_shape(shape: str, tokens: int, hf_tokens: int, batch: int, bandwidth: float, compile: bool) -> dict:
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        hf = random_checkpoint(shape, Path(tmp), dtype)
        model = load_model(tmp, dtype=dtype, device="cuda")
    wbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    gen = torch.Generator().manual_seed(1)
    vocab = PRESETS[shape].vocab_size
    prompts = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=gen).tolist()
    r = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "weight_mb": wbytes / 1e6}
    r["floor_tok_s"] = bandwidth * 1e9 / wbytes
    graphs = Engine(model, max_batch=batch, device="cuda")
    eager = Engine(model, max_batch=batch, device="cuda", graphs=False)
    r["single_tok_s"], ours = decode_rate(graphs, prompts[:1], tokens)
    r["graph_step_ms_rows1"] = step_ms(graphs, 1)
    graphs.config.launch_ahead = False
    r["single_no_overlap_tok_s"], _ = decode_rate(graphs, prompts[:1], tokens)
    graphs.config.launch_ahead = True
    r["single_eager_tok_s"], ours_eager = decode_rate(eager, prompts[:1], tokens)
    r[f"batch{batch}_tok_s"], _ = decode_rate(graphs, prompts, tokens)
    r[f"graph_step_ms_rows{batch}"] = step_ms(graphs, batch)
    r[f"batch{batch}_eager_tok_s"], _ = decode_rate(eager, prompts, tokens)
    if compile:
        try:
            r |= compiled_rates(model, prompts, tokens, batch)
            r["greedy_compiled_equal_eager"] = r.pop("tokens") == ours_eager
        except Exception as e:  # a compiler failure is a finding to report, not a reason to lose the run
            r["compile_error"] = f"{type(e).__name__}: {e}"[:2000]
    r["kernels_per_step"], r["kernel_table"] = profile_kernels(eager_step(eager))
    r["hf_single_tok_s"], theirs = hf_rate(hf, prompts[:1], hf_tokens)
    r[f"hf_batch{batch}_tok_s"], _ = hf_rate(hf, prompts, hf_tokens)
    r["floor_fraction"] = r["single_tok_s"] / r["floor_tok_s"]
    r["single_x_hf"] = r["single_tok_s"] / r["hf_single_tok_s"]
    r[f"batch{batch}_x_hf"] = r[f"batch{batch}_tok_s"] / r[f"hf_batch{batch}_tok_s"]
    n = min(len(ours), len(theirs))
    r["greedy_prefix_agree_hf"] = next((i for i in range(n) if ours[i] != theirs[i]), n)
    r["greedy_graphs_equal_eager"] = ours == ours_eager
    return r


def run(
    shapes=SHAPES, tokens: int = 128, hf_tokens: int = 64, batch: int = 32, out: str | None = None, compile: bool = True
) -> dict:
    device = torch.device("cuda")
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device),
        "tokens": tokens,
        "hf_tokens": hf_tokens,
        "batch": batch,
        "prompt_tokens": PROMPT_LEN,
    }
    report["tiny_check"] = check_tiny()
    report["shapes"] = []
    for shape in shapes:
        report["shapes"].append(bench_shape(shape, tokens, hf_tokens, batch, report["copy_bandwidth_gbs"], compile))
        torch.cuda.empty_cache()
        if out:
            Path(out).write_text(json.dumps(report, indent=1))
    return report


def best(s: dict, key: str) -> float | None:
    """The better of graphs and compiled graphs for "single" or "batchN" (None when not measured)."""
    rates = [s[k] for k in (f"{key}_tok_s", f"{key}_compiled_tok_s") if k in s]
    return max(rates) if rates else None


# The targets on one H100: (shape, what, at least, the figure from that shape's results).
TARGETS = (
    ("smollm2-135m", "single-stream tok/s", 1000, lambda s: best(s, "single")),
    ("smollm2-135m", "batch-32 tok/s", 20000, lambda s: best(s, "batch32")),
    ("llama-1b", "single-stream share of floor", 0.40, lambda s: best(s, "single") / s["floor_tok_s"]),
)


def target_lines(r: dict) -> list[str]:
    shapes = {s["shape"]: s for s in r["shapes"]}
    lines = []
    for shape, what, least, figure in TARGETS:
        got = figure(shapes[shape]) if shape in shapes else None
        if got is not None:
            fmt = "{:.0%}" if least < 1 else "{:,.0f}"  # a share or a rate
            verdict = "met" if got >= least else "NOT MET"
            lines.append(f"  {shape} {what} >= {fmt.format(least)}: {fmt.format(got)} {verdict}")
    return ["targets (best of graphs and compiled):"] + lines if lines else []


def print_report(r: dict) -> str:
    b = r["batch"]
    t = r["tiny_check"]
    lines = [
        f"{r['device']}, torch {r['torch']}: copy bandwidth {r['copy_bandwidth_gbs']:.0f} GB/s (read + write)",
        f"tiny model, greedy tokens vs CPU fp32: fp32 {t['fp32']['tokens_agree']}/{t['fp32']['of']} "
        f"(logit error {t['fp32']['relative_logit_error']:.1e}), bf16 {t['bf16']['tokens_agree']}/{t['bf16']['of']} "
        f"(logit error {t['bf16']['relative_logit_error']:.1e})",
        f"decode tokens/s ({r['tokens']} tokens per sequence, {r['prompt_tokens']}-token prompts, bf16, "
        "random weights)",
    ]
    for s in r["shapes"]:
        lines.append(
            f"{s['shape']}: {s['weight_mb']:.0f} MB of weights, floor {s['floor_tok_s']:.0f} tok/s, "
            f"{s['kernels_per_step']} kernels per eager step"
            + (f", {s['kernels_per_step_compiled']} compiled" if "kernels_per_step_compiled" in s else "")
        )
        for label, key, step in (("single  ", "single", "rows1"), (f"batch-{b}", f"batch{b}", f"rows{b}")):
            line = f"  {label} graphs {s[f'{key}_tok_s']:7.0f} (GPU step {s[f'graph_step_ms_{step}']:.3f} ms)"
            if f"{key}_compiled_tok_s" in s:
                ms = s[f"graph_step_ms_{step}_compiled"]
                line += f"  compiled {s[f'{key}_compiled_tok_s']:7.0f} (GPU step {ms:.3f} ms)"
            line += f"  eager {s[f'{key}_eager_tok_s']:6.0f}  transformers {s[f'hf_{key}_tok_s']:5.0f}"
            lines.append(line)
        if "single_no_overlap_tok_s" in s:  # results saved before steps were launched ahead lack it
            line = f"  single-stream without launching ahead: graphs {s['single_no_overlap_tok_s']:.0f}"
            if "single_compiled_no_overlap_tok_s" in s:
                line += f", compiled {s['single_compiled_no_overlap_tok_s']:.0f}"
            lines.append(line)
        single = best(s, "single")
        lines.append(
            f"  best single-stream {single / s['floor_tok_s']:.1%} of floor, x{single / s['hf_single_tok_s']:.0f} "
            f"transformers; greedy tokens agree with generate() for {s['greedy_prefix_agree_hf']}, "
            f"graphs = eager: {s['greedy_graphs_equal_eager']}"
            + (
                f", compiled = eager: {s['greedy_compiled_equal_eager']}, compile {s['compile_and_capture_s']:.0f} s"
                if "compile_and_capture_s" in s
                else ""
            )
        )
    return "\n".join(lines + target_lines(r))
