"""A replica split over tensor-parallel ranks inside one Ray actor (`--ray` with `--tp N`).

The actor is rank 0 (`start`): it starts the other N-1 ranks as processes of its own on its node
(`python -m service.jobs.ranks`), joins their group, and loads its shard; they load theirs and follow rank
0's step plans, as the ranks `nlg --tp N` launches do. On a GPU node the ranks share the actor's devices
(Ray reserved N of them for it): rank i takes the i-th. A rank whose actor is gone (killed, its node
lost) exits within `WATCH_S`: nothing outlives a replica; a rank that dies makes rank 0's next step fail
(the collective timeout), an engine failure that fails the job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import torch

WATCH_S = 1.0


def start(tp: int, model: str, options: dict, threads: int) -> list[subprocess.Popen]:
    """Make this process rank 0 of `tp` local ranks of `model` (`TextGenerator.load`'s `options`), each
    with `threads` torch threads; returns the other ranks' processes."""
    from parallel.launch import free_port, init_from_env

    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(tp)}
    group["LOCAL_WORLD_SIZE"] = str(tp)
    dtype = str(options.get("dtype", torch.float32)).removeprefix("torch.")
    argv = [model, options.get("device", "cpu"), dtype, options.get("quantization", "none"), str(threads)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "service.jobs.ranks", *argv],
            env=os.environ | group | {"RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(1, tp)
    ]
    os.environ.update(group | {"RANK": "0", "LOCAL_RANK": "0"})
    init_from_env()
    torch.set_num_threads(threads)
    return ranks


def follow(model: str, device: str, dtype: str, quantization: str, threads: str) -> None:
    """A rank > 0: its shard, then rank 0's plans until the stop message or rank 0's end."""
    from model.ranks import follow_named
    from parallel.launch import init_from_env

    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    here = init_from_env()
    torch.set_num_threads(int(threads))
    follow_named(model, here if device != "cpu" else torch.device("cpu"), getattr(torch, dtype), quantization)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    os._exit(1)


if __name__ == "__main__":
    follow(*sys.argv[1:])
