"""Our native CPU kernels, compiled once per machine and cached, registered as `torch.ops.nlg`: the
quantized matmuls (`matmul.cpp`), fp32 ones (`dense.cpp`, routed by `model.cpu_matmul`), RMSNorm, rotary,
attention and SwiGLU (`step.cpp`), and a whole decoder block of them in one call (`layer.cpp`); the last
two routed by `model.loader.use_native_step`.

`load()` builds them with torch's C++ extension API (a C++ compiler and ninja; the ninja wheel is a
dependency) into the model cache (`model.registry.cache_dir() / "kernels"`, keyed by torch's version and
the hash of the sources and flags, so a change rebuilds; a library already built there loads without a compiler,
as in the CPU image), loads them into this process and routes the quantized layers made after it to them
(`parallel.quant.use_native`). Where no compiler is found or the build fails, one line on stderr says so
and torch's own kernels run (slower). `NLG_KERNELS=off` skips them.
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

SOURCES = [Path(__file__).with_name(name) for name in ("matmul.cpp", "dense.cpp", "step.cpp", "layer.cpp")]
# -fopenmp: at::parallel_for splits work over threads only so; the library then needs libgomp.so.1, which
# resolves to the copy torch has loaded already (one thread pool, sized by torch.set_num_threads)
CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _build_dir() -> Path:
    from model.registry import cache_dir

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(CFLAGS + LDFLAGS).encode())
    digest = digest.hexdigest()[:16]
    return cache_dir() / "kernels" / f"torch{torch.__version__.replace('+', '-')}-{digest}"


@cache
def load() -> str | None:
    """Build (first time) and load the kernels; the instruction set they run with (`NLG_ISA` may name a
    lower one than the CPU's best, for tests and benches), or None when they are absent."""
    if os.environ.get("NLG_KERNELS") == "off":
        return None
    build = _build_dir()
    library = build / "nlg_kernels.so"
    if library.exists() and not (build / "lock").exists():  # built, and no build under way (torch's lock file)
        torch.ops.load_library(str(library))
    elif not _build(build):
        return None
    isa = os.environ.get("NLG_ISA") or torch.ops.nlg.isas()[-1]
    _register_fakes()
    use_native(isa)
    return isa


def _register_fakes() -> None:
    """The ops' output shapes for torch.compile's tracing (the C++ registers CPU kernels only)."""
    torch.library.register_fake("nlg::matmul")(
        lambda x, packed, n, isa, precise=False: x.new_empty(x.shape[0], n, dtype=torch.float32)
    )
    torch.library.register_fake("nlg::pack_dense")(lambda w: w.new_empty((w.shape[0] + 15) // 16, w.shape[1], 16))
    torch.library.register_fake("nlg::dense")(lambda x, packed, n, isa: x.new_empty(x.shape[0], n))
    torch.library.register_fake("nlg::rms_norm")(lambda x, weight, eps, isa: torch.empty_like(x))
    torch.library.register_fake("nlg::add_rms_norm")(
        lambda x, residual, weight, eps, isa: (torch.empty_like(x), torch.empty_like(x))
    )
    torch.library.register_fake("nlg::decode_attention")(lambda q, k, v, lengths, scale, isa: torch.empty_like(q))
    torch.library.register_fake("nlg::silu_mul")(lambda x, isa: x.new_empty(*x.shape[:-1], x.shape[-1] // 2))
    torch.library.register_fake("nlg::rope")(lambda x, cos, sin, isa: x.new_empty(x.shape))
    torch.library.register_fake("nlg::block")(lambda x, residual, *rest: (torch.empty_like(x), torch.empty_like(x)))


def _build(build: Path) -> bool:
    try:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or shutil.which("ninja") is None:
        print(f"no C++ compiler ({compiler}) or ninja: int4 matmuls run torch's kernel, 2-3x slower", file=sys.stderr)
        return False
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="nlg_kernels",
            sources=[str(p) for p in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a failed build leaves torch's kernels, said once
        print(f"our kernels did not build ({type(e).__name__}: {str(e)[-300:]}); torch's run, slower", file=sys.stderr)
        return False
    for old in build.parent.glob("torch*"):  # builds of earlier sources
        if old != build:
            shutil.rmtree(old, ignore_errors=True)
    return True
