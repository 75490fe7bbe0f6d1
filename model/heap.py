"""glibc's heap policy: hand the pages of freed memory back to the system after a load (`trim`), and keep
them between steps (`keep_freed`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def trim() -> None:
    """`malloc_trim(0)` where the C library has it (glibc; a no-op elsewhere). glibc keeps pages in its
    arenas after large tensors are freed, so a process that built something big once (a GGUF conversion,
    fp32 weights replaced by packed ones) would go on holding that much."""
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


@functools.cache
def keep_freed() -> None:
    """Have glibc's malloc keep the pages of freed blocks up to 256 MiB for the next step's tensors. By
    default it gives large blocks back to the kernel when they are freed (mmap under a moving threshold, heap
    trimming), so every step's activations of the same sizes fault their pages in again, zeroed: 100-250
    thousand faults in a 512-token prefill of the 1.5B model, ~6% of its time on one core. The process keeps
    its largest step's working set instead (tens of MB). Free heap past 64 MiB at its top still goes back on
    `free()`, so a server that took in a large upload does not keep it (`tests/service/test_hostile.py`: with
    1 GiB kept, the server's RSS grew 440 MB over four upload bombs), and `trim` hands back all of it.
    Elsewhere than glibc, nothing changes."""
    if hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: blocks below it come from the heap
        _LIBC.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: free heap kept at its top on free()
