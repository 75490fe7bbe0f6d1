"""`nlg`: the command line. Every subcommand takes `--model NAME_OR_PATH`; those whose output is
data take `--json`. Heavy imports happen inside the commands so `nlg --help` answers at once."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model.config import PRESETS
from model.registry import DEFAULT_MODEL, NAMES


def _load(args):

    from service.generate import TextGenerator

    return TextGenerator.load(args.model, device=args.device, dtype=dtype_of(args), compile=args.compile)


def dtype_of(args):
    """--dtype, or float32 on CPUs and bfloat16 on CUDA (float16 on cards without bf16, such as the V100)."""
    import torch

    if args.dtype:
        return getattr(torch, args.dtype)
    if str(args.device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _emit(args, data: dict, text: str) -> None:
    print(json.dumps(data, ensure_ascii=False) if args.json else text)


def cmd_answer(args) -> None:
    from service.tasks import answer

    a = answer(_load(args), args.question, args.passage or [], args.max_tokens)
    where = f"\n(drawn from passage {a.passage_index})" if a.passage_index is not None else ""
    _emit(
        args,
        {
            "answer": a.answer,
            "passage_index": a.passage_index,
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
        },
        a.answer + where,
    )


def cmd_summarize(args) -> None:
    from service.tasks import summarize

    if args.file == "-":
        document = sys.stdin.read()
    else:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        document = path.read_text(encoding="utf-8")
    s = summarize(_load(args), document, args.length, args.max_words)
    _emit(
        args,
        {"summary": s.summary, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens},
        s.summary,
    )


def cmd_generate(args) -> None:
    from service.sampling import SamplingParams

    gen = _load(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        stop_token_ids=tuple(args.stop_token_id or ()),
        ignore_eos=args.ignore_eos,
    )
    ids = (
        gen.tokenizer.chat([{"role": "user", "content": args.prompt}])
        if args.chat
        else gen.tokenizer.encode(args.prompt)
    )
    stream = None if args.json else (lambda i, piece: print(piece, end="", flush=True))
    r = gen.generate([ids], [params], on_text=stream)[0]
    if args.json:
        print(
            json.dumps(
                {
                    "text": r.text,
                    "token_ids": r.token_ids,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                },
                ensure_ascii=False,
            )
        )
    else:
        print()


def cmd_score(args) -> None:
    gen = _load(args)
    ids = gen.tokenizer.encode(args.text)
    logprobs = [None if t is None else t.logprob for t in gen.engine.prompt_logprobs(ids)]
    tokens = gen.tokenizer.tokens(ids)
    if args.json:
        print(json.dumps({"tokens": tokens, "token_ids": ids, "logprobs": logprobs}, ensure_ascii=False))
        return
    for tok, i, lp in zip(tokens, ids, logprobs):
        print(f"{i:>8}  {'' if lp is None else f'{lp:9.4f}':>9}  {tok!r}")


def cmd_fetch(args) -> None:
    from model.registry import resolve

    print(resolve(args.name))


def cmd_models(args) -> None:
    from model.registry import cache_dir

    rows = []
    for name, about in NAMES.items():
        ready = any(cache_dir().glob(f"{name}*/config.json"))
        rows.append({"name": name, "description": about, "cached": ready, "default": name == DEFAULT_MODEL})
    if args.json:
        print(json.dumps({"models": rows, "cache": str(cache_dir())}))
        return
    for r in rows:
        flags = ", ".join(f for f, on in (("default", r["default"]), ("cached", r["cached"])) if on)
        print(f"{r['name']:<24} {r['description']}{f'  [{flags}]' if flags else ''}")
    print(f"\nor any local Hugging Face directory (safetensors). Cache: {cache_dir()}")


def cmd_serve(args) -> None:
    import uvicorn

    from model.registry import cache_dir, resolve
    from service.app import build_app
    from service.loading import Loading

    resolve(args.model)  # fetch/convert first: a missing model is an error now, not a 503 later
    key = args.api_key or os.environ.get("NLG_API_KEY")
    jobs = args.jobs_db or str(cache_dir() / "jobs.sqlite")
    Path(jobs).parent.mkdir(parents=True, exist_ok=True)

    def fatal() -> None:  # an engine failure was reported (503): exit non-zero, loudly
        print("nlg: error: the engine failed; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    def load():
        gen = _load(args)
        print(f"nlg: {args.model} loaded in {gen.load_s:.1f} s; ready", file=sys.stderr, flush=True)
        return build_app(gen, fatal, key, args.slots, args.max_waiting, jobs, args.request_timeout, args.score_traffic)

    url = f"http://{args.host}:{args.port}"
    print(
        f"nlg: serving {args.model} at {url}  (API docs: {url}/docs; /ready turns 200 once loaded)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(Loading(load, fatal), host=args.host, port=args.port, log_level="info")


def cmd_batch(args) -> None:
    from tqdm import tqdm

    from service.batch import run_job

    src, out = Path(args.input), Path(args.output)
    gen = _load(args)
    with tqdm(desc=f"{args.task} {src.name}", unit="rec", disable=args.quiet) as bar:

        def progress(tokens: int) -> None:
            bar.update(1)
            progress.tokens += tokens
            bar.set_postfix(tok_s=f"{progress.tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")

        progress.tokens = 0
        s = run_job(gen, args.task, src, out, args.workers, progress, on_start=lambda n: setattr(bar, "total", n))
    errors = out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")
    print(
        f"{s.succeeded} done, {s.failed} failed (see {errors}), {s.skipped} already done earlier, "
        f"of {s.total} records, in {s.seconds:.1f} s ({s.completion_tokens / max(s.seconds, 1e-9):.1f} tok/s)",
        file=sys.stderr,
    )


def cmd_eval(args) -> None:
    from tqdm import tqdm

    from service.bulk_eval import MAIN, markdown, run_eval

    gen = _load(args)
    if args.task in ("lambada", "wikitext"):
        from service import lm_eval

        with tqdm(desc=f"eval {args.task}", unit="ex", total=args.limit, disable=args.quiet) as bar:
            report = lm_eval.run(
                gen, args.task, Path(args.data), Path(args.out), args.limit, args.window, args.stride, bar.update
            )
        summary = {k: v for k, v in report.items() if k != "examples"}
        print(json.dumps(summary) if args.json else lm_eval.markdown(report) + f"\nreport in {args.out}")
        return
    with tqdm(desc=f"eval {args.task}", unit="ex", total=args.limit, disable=args.quiet) as bar:
        report = run_eval(
            gen,
            args.task,
            Path(args.data),
            Path(args.out),
            args.limit,
            args.length,
            args.workers,
            progress=lambda: bar.update(1),
        )
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}))
    else:
        print(markdown(report) + f"\nmain metric {MAIN[args.task]}; report, table and plot in {args.out}")


def cmd_make_random(args) -> None:
    from model.tiny import write_model_dir

    write_model_dir(Path(args.out), PRESETS[args.preset], args.seed)
    print(f"wrote {args.preset} with random weights (seed {args.seed}) to {args.out}")


def cmd_bench(args) -> None:
    if args.target == "serve":
        from service.bench_serve import print_report, run

        report = run(
            args.model, clients=args.clients, tokens=args.tokens, extra=["--dtype", args.dtype] if args.dtype else []
        )
        print(json.dumps(report) if args.json else print_report(report))
        return
    if args.tp > 1:
        from service.bench_tp import print_sweep, run_sweep

        report = run_sweep(args.model, args.tp, tokens=args.tokens)
        print(json.dumps(report) if args.json else print_sweep(report))
        return
    if args.device.startswith("cuda"):
        from service.bench_gpu import print_report, run

        report = run(tokens=args.tokens, hf_tokens=min(args.tokens, 64), out=args.save)
        print(json.dumps(report) if args.json else print_report(report))
        return
    from service.bench import print_report, run

    report = run(args.model, tokens=args.tokens, with_hf=not args.no_hf)
    print(json.dumps(report) if args.json else print_report(report))


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a model name ({', '.join(NAMES)}) or a local Hugging Face directory (default: {DEFAULT_MODEL})",
    )
    common.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu); with --tp, rank i uses cuda:i")
    common.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights and KV cache (default: float32 on CPUs, bfloat16 on CUDA, float16 on CUDA cards without "
        "bf16; bfloat16 also batches faster on CPUs with AMX)",
    )
    common.add_argument("--tp", type=int, default=1, metavar="N", help="split the model over N local ranks")
    common.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: torch.compile the decode step the CUDA graphs record (on an H100: 1.3x single-stream, 1.6x "
        "batch-32 for SmolLM2; about a minute of compiling at the first requests)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON object")

    p = argparse.ArgumentParser(
        prog="nlg", description="Full-sentence answers and abstractive summaries from a decoder-only transformer."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("answer", parents=[common, as_json], help="answer a question in one full sentence")
    a.add_argument("question")
    a.add_argument("--passage", action="append", metavar="TEXT", help="a context passage (repeatable)")
    a.add_argument("--max-tokens", type=int, default=80)
    a.set_defaults(run=cmd_answer)

    s = sub.add_parser("summarize", parents=[common, as_json], help="summarize a document (file or stdin)")
    s.add_argument("file", nargs="?", default="-", help="a UTF-8 text file, or - for stdin (default)")
    s.add_argument("--length", choices=["short", "medium", "long"], default="medium")
    s.add_argument("--max-words", type=int, help="at most this many words (overrides --length)")
    s.set_defaults(run=cmd_summarize)

    g = sub.add_parser("generate", parents=[common, as_json], help="continue a prompt (streams to stdout)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable; not returned)")
    g.add_argument("--stop-token-id", action="append", type=int, metavar="ID", help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    g.set_defaults(run=cmd_generate)

    c = sub.add_parser("score", parents=[common, as_json], help="per-token log-probabilities of a text")
    c.add_argument("text")
    c.set_defaults(run=cmd_score)

    m = sub.add_parser("models", parents=[as_json], help="list the named models")
    m.set_defaults(run=cmd_models)

    v = sub.add_parser("serve", parents=[common], help="run the HTTP service")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set NLG_API_KEY)")
    v.add_argument("--slots", type=int, default=16, help="sequences decoded together (KV cache slots; default 16)")
    v.add_argument("--max-waiting", type=int, default=64, help="queued sequences before 429 (default 64)")
    v.add_argument("--request-timeout", type=float, default=600, help="seconds before a request gets 504")
    v.add_argument(
        "--score-traffic",
        action="store_true",
        help="score every answer (sentence, support) and summary (support, novelty) into the Prometheus "
        "histogram nlg_quality_score",
    )
    v.add_argument("--jobs-db", help="SQLite file of batch jobs (default: jobs.sqlite in the model cache)")
    v.set_defaults(run=cmd_serve)

    b = sub.add_parser(
        "bench",
        parents=[common, as_json],
        help="our engine vs transformers generate(), same run",
        description="Our engine vs transformers generate() on the same weights, in one run. With --tp N: the "
        "same model at every valid tensor-parallel size up to N, each in fresh processes (per-rank peak RSS "
        "after loading, decode tokens/s). With --device cuda: random weights of the SmolLM2-135M and 1B Llama "
        "shapes, bf16, single-stream and batch-32, CUDA graphs on and off, and the card's copy bandwidth.",
    )
    b.add_argument(
        "target",
        nargs="?",
        choices=["engine", "serve"],
        default="engine",
        help="engine (default), or serve: concurrent HTTP clients vs one at a time",
    )
    b.add_argument("--clients", type=int, default=16, help="bench serve: concurrent clients (default 16)")
    b.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    b.add_argument("--save", metavar="FILE", help="--device cuda: also write the JSON report to FILE, shape by shape")
    b.set_defaults(run=cmd_bench)
    j = sub.add_parser("batch", parents=[common], help="summarize or answer every line of a JSONL file (resumable)")
    j.add_argument("task", choices=["summarize", "answer"])
    j.add_argument("input", help="JSONL: {document, length?, max_words?} or {question, passages?}, optional id")
    j.add_argument("-o", "--output", required=True, help="results JSONL (appended; a rerun resumes)")
    j.add_argument("--workers", type=int, default=8, help="records in flight, batched by the engine (default 8)")
    j.add_argument("--quiet", action="store_true", help="no progress bar")
    j.set_defaults(run=cmd_batch)

    e = sub.add_parser("eval", parents=[common, as_json], help="run a task over a data set and score it")
    e.add_argument("task", choices=["summarize", "qa", "lambada", "wikitext"])
    e.add_argument(
        "--data",
        required=True,
        help="JSONL: {id, document, summary} (summarize), {id, question, context, answers} (qa), {text} (lambada); "
        "a text file (wikitext)",
    )
    e.add_argument("--limit", type=int, help="only the first N examples")
    e.add_argument("--out", default="eval-out", help="directory for report.json, report.md, scores.png")
    e.add_argument("--length", choices=["short", "medium", "long"], default="medium", help="summary length")
    e.add_argument("--workers", type=int, default=8, help="examples in flight, batched by the engine")
    e.add_argument("--window", type=int, default=2048, help="wikitext: tokens per window (default 2048)")
    e.add_argument("--stride", type=int, help="wikitext: tokens between window starts (default window - 1)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=cmd_eval)

    f = sub.add_parser("fetch", help="fetch and convert a named model into the cache now (images do it at build)")
    f.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"a model name (default: {DEFAULT_MODEL})")
    f.set_defaults(run=cmd_fetch)

    r = sub.add_parser("make-random", help="write a random-weight model directory of a named shape")
    r.add_argument("out", help="directory to write (config.json, model.safetensors, tokenizer)")
    r.add_argument("--preset", default="llama-400m", choices=sorted(PRESETS), help="shape (default llama-400m)")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(run=cmd_make_random)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.command != "bench" and (getattr(args, "tp", 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        from service.launcher import run_tensor_parallel

        return run_tensor_parallel(args, argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run one parsed command in this process; returns the exit status."""
    from model.registry import ModelNotFound

    try:
        args.run(args)
    except (ModelNotFound, FileNotFoundError, ValueError) as e:
        print(f"nlg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
