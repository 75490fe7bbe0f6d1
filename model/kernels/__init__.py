"""Our native CPU kernels (`matmul.cpp`), compiled once per machine and cached, registered as `torch.ops.nlg`.

`load()` builds them with torch's C++ extension API (g++ and ninja; the ninja wheel is a dependency)
into the model cache (`model.registry.cache_dir() / "kernels"`, keyed by torch's version and the
sources' hash, so a changed source rebuilds), loads them into this process and routes the quantized
layers made after it to them (`parallel.quant.use_native`). Where no compiler is found or the build fails, one line on
stderr says so and torch's own kernels run (slower). `NLG_KERNELS=off` skips the build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from functools import cache
from pathlib import Path

import torch

from parallel.quant import use_native

SOURCES = [Path(__file__).with_name("matmul.cpp")]


def _build_dir() -> Path:
    from model.registry import cache_dir

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    return cache_dir() / "kernels" / f"torch{torch.__version__.replace('+', '-')}-{digest}"


@cache
def load() -> str | None:
    """Build (first time) and load the kernels; the instruction set they run with (`NLG_ISA` may name a
    lower one than the CPU's best, for tests and benches), or None when they are absent."""
    if os.environ.get("NLG_KERNELS") == "off":
        return None
    try:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or shutil.which("ninja") is None:
        print(f"no C++ compiler ({compiler}) or ninja: int4 matmuls run torch's kernel, 2-3x slower", file=sys.stderr)
        return None
    from torch.utils import cpp_extension

    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="nlg_kernels",
            sources=[str(p) for p in SOURCES],
            extra_cflags=["-O3", "-std=c++17"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a failed build leaves torch's kernels, said once
        print(f"our kernels did not build ({type(e).__name__}: {str(e)[-300:]}); torch's run, slower", file=sys.stderr)
        return None
    isa = os.environ.get("NLG_ISA") or torch.ops.nlg.best_isa()  # NLG_ISA: a lower one, for tests and benches
    use_native(isa)
    return isa
