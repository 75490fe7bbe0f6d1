"""Starting tensor-parallel ranks and keeping them in step.

- `launch(n, fn, *args)`: spawn n local ranks with torch's elastic launcher (what `torchrun
  --standalone` uses). If any rank dies, the launcher stops the others and raises; nothing retries.
- `init_from_env()`: join the group described by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT): NCCL when CUDA is present, gloo on CPU, with a collective timeout in
  seconds rather than NCCL's 30 minutes.
- The control plane: rank 0 owns every model call. Before each one it `send_plan`s what to run; ranks
  > 0 sit in `follow_plans`, run the same call, and return on a stop message. Plans travel over a
  separate gloo group without a timeout for the receivers (a worker may wait as long as rank 0 is
  idle); rank 0's sends keep the short collective timeout, like the compute collectives: NOTE gloo's
  send to a stopped (SIGSTOP) peer waits for that peer, so without it a hung rank hung rank 0 too.
- `abort()`: after a failure, SIGKILL the other ranks on this machine (a hung or stopped rank would
  never see a stop message, and would hold the launcher for its 30 s kill timeout) and exit non-zero.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from parallel.state import get_tp, set_tp

DEFAULT_TIMEOUT_S = 10.0  # a hung rank is seen in seconds (a health check's ~15 s), not minutes
MONITOR_S = 0.2  # how often the launcher looks for ranks that ended
STOP = "stop"
_plan_group: dist.ProcessGroup | None = None
_ranks: list[tuple[str, int]] = []  # (host, pid) of every rank, gathered at init
_timeout = timedelta(seconds=DEFAULT_TIMEOUT_S)  # the collectives' timeout, for rank 0's plan sends too


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on `nproc` local ranks; returns rank 0's return value. Raises
    `torch.distributed.elastic.multiprocessing.errors.ChildFailedError` naming the rank that failed."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=MONITOR_S,
    )
    return elastic_launch(config, fn)(*args)[0]


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous, or a server in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(timeout_s: float | None = None) -> torch.device:
    """Join the process group torchrun describes (no-op at WORLD_SIZE 1); returns this rank's device."""
    global _plan_group, _timeout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before init_process_group: NCCL binds to the current device
    if world == 1:
        return device
    if not cuda:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("NLG_TP_TIMEOUT", DEFAULT_TIMEOUT_S)))
    _timeout = timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _plan_group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    set_tp(dist.get_rank(), world, dist.group.WORLD)
    _ranks[:] = [None] * world
    dist.all_gather_object(_ranks, (socket.gethostname(), os.getpid()), group=_plan_group)
    return device


def send_plan(plan: Any) -> None:
    """Rank 0: tell every other rank what to run next (any picklable object). Raises if a rank does not
    take it within the collective timeout."""
    if get_tp().size > 1:
        data = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8)
        for t in (torch.tensor([data.numel()]), data):  # its size, then the pickled plan
            try:
                dist.broadcast(t, src=0, group=_plan_group, async_op=True).wait(_timeout)
            except RuntimeError as e:
                s = _timeout.total_seconds()
                raise RuntimeError(f"a tensor-parallel rank did not take the step plan within {s:g} s: {e}") from e


def follow_plans(run: Callable[[Any], None]) -> None:
    """Ranks > 0: run each plan rank 0 sends, until the stop message."""
    while True:
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, src=0, group=_plan_group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=_plan_group)
        plan = pickle.loads(data.numpy().tobytes())
        if plan == STOP:
            return
        run(plan)


def shutdown() -> None:
    """Rank 0 sends the stop message; every rank leaves the group."""
    if get_tp().size == 1:
        return
    if get_tp().rank == 0:
        send_plan(STOP)
    dist.destroy_process_group()


def abort(status: int = 1) -> None:
    """Kill the other ranks on this machine and exit, without the stop message or the group's teardown
    (both wait on peers that may be gone). The exit waits for the launcher to look once more: it names
    only the first rank it finds ended, and that should be the peer that died (or hung) first, not this
    rank, which only noticed."""
    sys.stdout.flush()
    sys.stderr.flush()
    me = (socket.gethostname(), os.getpid())
    for host, pid in _ranks:
        if host == me[0] and pid != me[1]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(3 * MONITOR_S)
    os._exit(status)
