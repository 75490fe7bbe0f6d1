"""glibc heap policy (`model.heap`): freed pages kept for the next step (`keep_freed`, set by the CPU runner)."""

from __future__ import annotations

import resource

import pytest
import torch

from model.heap import keep_freed


def _faults(mb: int) -> int:
    """Minor page faults of making and writing a tensor of `mb` MB (then freeing it)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(mb << 18).fill_(1.0)  # mb MiB of fp32
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_steps_tensors_reuse_pages():
    """Once kept, 40 MiB activations freed and made again (a 512-token prefill's gate/up output is 36 MB)
    take most of their pages back from the heap instead of faulting 10,240 fresh ones in each time. Not
    every time: torch's 64-byte-aligned allocation can need a little more than the freed block it follows
    (seen: every other one reuses, the rest extend the heap)."""
    if resource.getpagesize() != 4096:
        pytest.skip("4 KiB pages assumed")
    keep_freed()
    _faults(40)
    assert sum(_faults(40) for _ in range(6)) < 4 * 10240  # 6 * 10240 without
