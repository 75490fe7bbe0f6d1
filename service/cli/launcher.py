"""Running an `nlg` command split over tensor-parallel ranks.

`nlg ... --tp N` checks N against the model, then starts N local ranks with torch's elastic launcher,
handing each the parsed command line; under `torchrun` this process already is one rank. Rank 0 runs
the command (CLI output, HTTP server, scheduling, sampling) and ranks > 0 load their shard
and follow rank 0's step plans. If any rank dies, the launcher stops the rest and we exit non-zero
naming it (a rank killed by a signal first: it is the cause, the others' errors its effect).

Stopping: SIGTERM or Ctrl-C reaches every rank, but ranks > 0 ignore both and wait for rank 0's stop
message, so that `serve` drains its requests (as at tp=1) before the group goes down; `serve` then
exits 0. After an engine failure rank 0 kills the other ranks itself (`parallel.launch.abort`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch


def run_tensor_parallel(args: argparse.Namespace) -> int:
    from parallel.launch import launch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun: this process is one of the ranks
        if args.tp not in (1, world):
            return _fail(f"--tp {args.tp} but torchrun started {world} ranks")
        return rank_main(args)
    try:
        check(args.model, args.tp)
    except (LookupError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        return launch(args.tp, rank_main, args)
    except ChildFailedError as e:
        return _fail(describe(e.failures), 1)
    except SignalException as e:  # the ranks were sent the signal and have stopped
        return 0 if args.command == "serve" else 128 + int(e.sigval)


def describe(failures: dict) -> str:
    """Which rank failed first, and how every failed rank ended."""

    def how(f) -> str:
        return f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"

    order = sorted(failures, key=lambda r: (failures[r].exitcode >= 0, failures[r].timestamp, r))
    first = order[0]
    then = "".join(f"; then rank {r} {how(failures[r])}" for r in order[1:])
    return f"tensor-parallel rank {first} failed ({how(failures[first])}){then}; all ranks were stopped"


def check(model: str, tp: int) -> None:
    """Refuse an impossible split before starting any rank (fetching the model first if needed)."""
    from model.loader import read_config
    from model.registry import resolve

    read_config(resolve(model)).check_tp(tp)


def rank_main(args: argparse.Namespace) -> int:
    """The entry point of every rank."""
    from model.ranks import follow_named
    from parallel.launch import init_from_env, shutdown
    from parallel.state import get_tp
    from service.cli.commands import dtype_of, run

    device = init_from_env()
    if args.device == "cpu":
        device = torch.device("cpu")
    try:
        if get_tp().rank == 0:
            return run(args)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when to stop (see the module doc)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow_named(args.model, device, dtype_of(args), args.quantize)
        return 0
    finally:
        shutdown()


def _fail(message: str, status: int = 2) -> int:
    print(f"nlg: error: {message}", file=sys.stderr)
    return status
