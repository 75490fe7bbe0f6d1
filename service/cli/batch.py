"""`nlg batch`: a file or folder of records through the engine, here or on a Ray cluster (`--ray`)."""

from __future__ import annotations

import sys
from pathlib import Path

from service.cli.commands import load, replicas


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

    gen = load(args)
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
        replicas(args),
        on_start=lambda n: print(f"{n} records to do on {args.replicas} replicas", file=sys.stderr),
    )
