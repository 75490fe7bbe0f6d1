"""`nlg eval`, `nlg bench` and `nlg make-random`: quality and speed measurements, and the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

from model.config import PRESETS
from service.cli.commands import load


def cmd_eval(args) -> None:
    from tqdm import tqdm

    from service.evals.bulk import MAIN, markdown, run_eval

    gen = load(args)
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
            other_passages=Path(args.other_passages) if args.other_passages else None,
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
    if args.target == "replicas":
        from service.bench.replicas import print_report, run

        report = run(args.model, clients=args.clients, tokens=args.tokens)
        print(json.dumps(report) if args.json else print_report(report))
        return
    if args.target == "serve":
        from service.bench.serve import print_report, run

        report = run(
            args.model,
            clients=args.clients,
            tokens=args.tokens,
            extra=(["--dtype", args.dtype] if args.dtype else [])
            + ["--quantize", args.quantize]
            + (["--prompt-lookup", str(args.prompt_lookup)] if args.prompt_lookup is not None else []),
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
