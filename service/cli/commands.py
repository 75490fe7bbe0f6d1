"""What each `nlg` subcommand does (`service.cli.parser` parses the command line and calls these). Heavy
imports happen inside the commands so `nlg --help` answers at once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from model.config import PRESETS
from model.registry import DEFAULT_MODEL, NAMES


def run(args) -> int:
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


def _load(args):
    from service.engine.generator import TextGenerator

    return TextGenerator.load(args.model, **load_options(args))


def load_options(args) -> dict:
    """`TextGenerator.load`'s arguments from the command line, but the model's name."""
    return {
        "device": args.device,
        "dtype": dtype_of(args),
        "quantization": args.quantize,
        "compile": args.compile,
        "context": args.context,
        "kv_memory": args.kv_cache_memory,
        "prefix_caching": not args.no_prefix_caching,
        "prompt_lookup": args.prompt_lookup,
    }


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
    from service.tasks.answer import answer

    found = _file_passages(args.question, args.file or [])
    passages = (args.passage or []) + [p.text for p in found]
    a = answer(_load(args), args.question, passages, args.max_tokens)
    data = {
        "answer": a.answer,
        "passage_index": a.passage_index,
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
    }
    where = f"\n(drawn from passage {a.passage_index})" if a.passage_index is not None else ""
    cited = a.passage_index - len(args.passage or []) if a.passage_index is not None else -1
    if cited >= 0:
        p = found[cited]
        data["citation"] = {"file": p.file, "part": p.part, "start": p.start, "end": p.end, "passage": p.text}
        where = f"\n(from {p.file}, {p.part}, characters {p.start}-{p.end})"
    _emit(args, data, a.answer + where)


def _file_passages(question: str, files: list[str]):
    """The passages of the files ranked best for the question (`service.retrieval`)."""
    if not files:
        return []
    from service import documents, retrieval

    docs = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        docs.append(documents.read(path.read_bytes(), path.name))
    return retrieval.rank(question, retrieval.passages(docs))


def cmd_summarize(args) -> None:
    from service.tasks.summarize import summarize

    if args.file == "-":
        s = summarize(_load(args), sys.stdin.read(), args.length, args.max_words)
    else:
        from service.documents import read
        from service.tasks.documents import document_plan
        from service.tasks.plans import run_plan

        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        doc = read(path.read_bytes(), path.name)  # e-mail, Word, PowerPoint, Excel, PDF, HTML, text
        s = run_plan(gen := _load(args), document_plan(gen, [doc], args.length, args.max_words))
    data = {"summary": s.summary, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}
    if s.citations is not None:
        data["citations"] = s.citations
    _emit(args, data, s.summary)


def cmd_generate(args) -> None:
    from service.engine.sampling import SamplingParams

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
    logprobs = [None if t is None else t.logprob for t in gen.prompt_logprobs(ids)]
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
    import threading

    import uvicorn

    from model.registry import cache_dir, resolve
    from parallel.launch import abort
    from service.server.app import build_app
    from service.server.connections import guarded
    from service.server.loading import Loading
    from service.server.streams import DRAIN_S

    resolve(args.model)  # fetch/convert first: a missing model is an error now, not a 503 later
    key = args.api_key or os.environ.get("NLG_API_KEY")
    jobs = args.jobs_db or str(cache_dir() / "jobs.sqlite")
    Path(jobs).parent.mkdir(parents=True, exist_ok=True)
    failed = threading.Event()
    on_ray = None
    if args.ray:
        from service.jobs.cluster import connect

        connect(args.ray)
        on_ray = _replicas(args)

    def fatal() -> None:
        """The engine failed (its cause is printed) and every request in flight has its error: let the
        server send those replies, then exit non-zero. A shutdown that hangs is cut short."""
        print("nlg: error: the engine failed; answering the requests in flight, then exiting", file=sys.stderr)
        failed.set()
        server.should_exit = True
        timer = threading.Timer(DRAIN_S + 5, abort)
        timer.daemon = True
        timer.start()

    def load():
        gen = _load(args)
        gen.name = args.served_model_name or gen.name  # what clients name in "model" and /v1/models lists
        print(f"nlg: {args.model} loaded in {gen.load_s:.1f} s; ready", file=sys.stderr, flush=True)
        return build_app(
            gen, fatal, key, args.slots, args.max_waiting, jobs, args.request_timeout, args.score_traffic, on_ray
        )

    url = f"http://{args.host}:{args.port}"
    print(
        f"nlg: serving {args.model} at {url}  (API docs: {url}/docs; /ready turns 200 once loaded)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        Loading(load, fatal),
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=DRAIN_S,  # the streams' own grace: one number for both
        **guarded(),  # a deadline for request heads, a cap on connections
    )
    server = uvicorn.Server(config)
    server.run()
    if failed.is_set():
        abort()  # exit 1 now, taking any other tensor-parallel ranks down with this one


def cmd_batch(args) -> None:
    from service.jobs.jsonl import errors_of

    out = Path(args.output)
    s = _batch_on_ray(args, out) if args.ray else _batch_here(args, out)
    took = max(s.seconds, 1e-9)
    print(
        f"{s.succeeded} done, {s.failed} failed (see {errors_of(out)}), {s.skipped} already done earlier, "
        f"of {s.total} records, in {s.seconds:.1f} s ({(s.succeeded + s.failed) / took:.2f} records/s, "
        f"{s.completion_tokens / took:.1f} tok/s)",
        file=sys.stderr,
    )
    for name, (records, tokens) in sorted(s.replicas.items()):
        print(
            f"  replica {name}: {records} records ({records / took:.2f}/s), {tokens / took:.1f} tok/s", file=sys.stderr
        )


def _batch_here(args, out: Path):
    from tqdm import tqdm

    from service.jobs.files import run_job

    gen = _load(args)
    with tqdm(desc=f"{args.task} {Path(args.input).name}", unit="rec", disable=args.quiet) as bar:

        def progress(tokens: int) -> None:
            bar.update(1)
            progress.tokens += tokens
            bar.set_postfix(tok_s=f"{progress.tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")

        progress.tokens = 0
        return run_job(gen, args.task, args.input, out, args.workers, progress, lambda n: setattr(bar, "total", n))


def _batch_on_ray(args, out: Path):
    from service.jobs.cluster import connect, run_on_ray

    connect(args.ray)
    return run_on_ray(
        args.task,
        args.input,
        out,
        _replicas(args),
        on_start=lambda n: print(f"{n} records to do on {args.replicas} replicas", file=sys.stderr),
    )


def _replicas(args):
    """--replicas engine actors of --model, loaded as the command line says."""
    from service.jobs.cluster import Replicas

    gpus = str(args.device).startswith("cuda")
    return Replicas(args.model, load_options(args), args.replicas, args.replica_cpus, gpus, args.tp)


def cmd_eval(args) -> None:
    from tqdm import tqdm

    from service.evals.bulk import MAIN, markdown, run_eval

    gen = _load(args)
    if args.task in ("lambada", "wikitext"):
        from service.evals import lm_eval

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
            retrieve=args.retrieve,
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
    if args.target == "batch":
        from service.bench.batch import print_report, run

        if not args.data:
            raise ValueError("bench batch needs --data FILE (JSONL of {document} records)")
        report = run(args.model, args.data, args.limit)
        print(json.dumps(report) if args.json else print_report(report))
        return
    if args.target == "serve":
        from service.bench.serve import print_report, run

        report = run(
            args.model,
            clients=args.clients,
            tokens=args.tokens,
            extra=(["--dtype", args.dtype] if args.dtype else []) + ["--quantize", args.quantize],
        )
        print(json.dumps(report) if args.json else print_report(report))
        return
    if args.tp > 1:
        from service.bench.tp import print_sweep, run_sweep

        report = run_sweep(args.model, args.tp, tokens=args.tokens)
        print(json.dumps(report) if args.json else print_sweep(report))
        return
    if args.device.startswith("cuda"):
        from service.bench.gpu import print_report, run

        report = run(tokens=args.tokens, hf_tokens=min(args.tokens, 64), out=args.save)
        print(json.dumps(report) if args.json else print_report(report))
        return
    from service.bench.cpu import print_report, run

    report = run(
        args.model, tokens=args.tokens, with_hf=not args.no_hf, quantization=args.quantize, with_peers=not args.no_peers
    )
    print(json.dumps(report) if args.json else print_report(report))
