"""Hand the pages of freed memory back to the system. glibc keeps them in its arenas after large tensors
are freed, so a process that built something big once (a GGUF conversion, fp32 weights replaced by packed
ones) would go on holding that much."""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def trim() -> None:
    """`malloc_trim(0)` where the C library has it (glibc; a no-op elsewhere)."""
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
