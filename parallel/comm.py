"""Forward-only collectives, named as in Megatron-LM.

The names say where a tensor is replicated and where it is partial:
- `reduce_from_tensor_parallel_region`: each rank holds a partial sum; all-reduce it.
- `gather_from_tensor_parallel_region`: each rank holds a slice of the last dim; all-gather it.

Inference only: no autograd functions. At world size 1 every helper returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.state import get_tp


def reduce_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    tp = get_tp()
    if tp.size == 1:
        return x
    dist.all_reduce(x, group=tp.group)
    return x


def gather_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    tp = get_tp()
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)
