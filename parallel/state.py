"""Tensor-parallel process-group state.

Holds which rank this process is and how many ranks share the model. At world size 1 (the default,
no process group) every collective in `parallel.comm` returns its input unchanged, so the plain
model needs no `torch.distributed` at all. Starting real groups is `parallel.launch.init_from_env`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


_STATE = TPState()


def get_tp() -> TPState:
    return _STATE


def set_tp(rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
    """Set this process's tensor-parallel rank and size. Layers built afterwards take this rank's
    shard. Collectives at size > 1 need an initialized process group; without one (tests that
    simulate ranks in one process) only building and loading shards works."""
    global _STATE
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} out of range for size {size}")
    _STATE = TPState(rank, size, group)
