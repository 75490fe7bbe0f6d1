"""How big the paged KV cache is: the block size, the default shares of memory, and `--kv-cache-memory`
sizes. No torch here: the command line reads it before anything heavy is imported."""

from __future__ import annotations

import argparse
import re

BLOCK_SIZE = 16  # positions per KV-cache block (see README: chosen by measurement)
CPU_SHARE = 0.2  # the default KV cache on CPUs: at most this share of the machine's memory, over all ranks
GPU_SHARE = 0.9  # the default KV cache on CUDA: at most this share of the memory free after the weights
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}


def memory_size(text: str) -> int:
    """Bytes of a size such as `2GiB`, `512MB`, `1.5g` or `1000000` (an argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 2GiB, 512MB or a number of bytes)")
    return int(float(m.group(1)) * UNITS[unit])
