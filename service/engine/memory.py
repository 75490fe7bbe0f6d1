"""How big the paged KV cache is: the block size, the default shares of memory, `--kv-cache-memory` sizes,
and the cache's layout in blocks and regions (`layout`), refused with what to change when it cannot be
made (`CacheTooLarge`). No torch here: the command line reads it before anything heavy is imported; the
model runner measures the memory and makes the cache."""

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


class CacheTooLarge(ValueError):
    """A KV cache bigger than the device's free memory, or too small for one block per sequence."""


def default_kv_memory(free: int | None, total: int, ranks: int) -> int:
    """The KV cache's bytes on a rank when --kv-cache-memory is not given: a share of the device's `free`
    bytes (CUDA, after the weights), else (`free` None: a CPU) a share of the machine's `total` over its
    `ranks`."""
    return int(free * GPU_SHARE) if free is not None else int(total * CPU_SHARE / ranks)


def layout(slots: int, per_sequence: int, block_bytes: int, kv_memory: int | None, default: int) -> tuple[int, int]:
    """(blocks, blocks per region) of a cache of blocks of `block_bytes`: as many as `kv_memory` holds;
    without it, within `default` bytes, a home region of `per_sequence` blocks for each of `slots`
    sequences and one more region (the null block's). A region holds `per_sequence` blocks at most."""
    if kv_memory is not None:
        blocks = kv_memory // block_bytes
    else:
        blocks = min((slots + 1) * per_sequence, default // block_bytes)
    region = max(1, min(per_sequence, blocks // (slots + 1)))
    return blocks // region * region, region


def check(blocks: int, slots: int, block_size: int, block_bytes: int, free: int | None, device: str) -> None:
    """Refuse a cache of `blocks` that does not fit the device's `free` bytes (None: a CPU, whose pages are
    taken as they are written), or that holds less than a block for each of `slots` sequences."""
    need = blocks * block_bytes
    if free is not None and need > free:
        raise CacheTooLarge(
            f"the KV cache of {blocks} blocks needs {need / 2**30:.2f} GiB and {device} has "
            f"{free / 2**30:.2f} GiB free: lower --kv-cache-memory"
        )
    if blocks < slots + 1:
        raise CacheTooLarge(
            f"--kv-cache-memory holds {max(blocks - 1, 0)} blocks of {block_size} tokens "
            f"({block_bytes} bytes each) and {slots} sequences need one each: raise it"
        )
