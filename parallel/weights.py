"""Per-rank sharded weight reading from safetensors.

`SafetensorsReader` opens a single `model.safetensors` or a sharded set listed in
`model.safetensors.index.json` and hands out lazy slices (`get_slice`), so a rank reads only the
rows or columns it keeps. `load_into` fills a module built on the meta device: each parallel
layer cuts its own piece (`shard`), every other parameter is read whole (replicated). A weight stored
quantized (int4 or int8 forms, `model.gguf_quant`) is cut the same way and left as `layer.stored`. Parameters are
named after checkpoint keys; a merged layer names the sibling keys it stacks (see `parallel.layers`).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from parallel.stored import dequantize, int8_form

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsReader:
    """Where each tensor lives, and lazy slices of it (`get_slice`).

    Every read returns memory this process owns. A run of whole rows (`t[a:b]`, `t[:]`, or every column,
    `t[:, :n]`) is read from the file with plain reads: it costs its own bytes, not mapped pages of the file
    as well (which count in RSS while mapped: loading Qwen2.5-1.5B held 330 MB of them beside their copies).
    Any other cut (a rank's columns) goes through safetensors' mapped slice and is copied out; those
    handles are dropped by `release()`, which keeps a rank's peak near its share.
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(directory.glob("*.safetensors"))]
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self._entry: dict[str, tuple[Path, int, list[int], torch.dtype]] = {}
        for name in files:
            path = directory / name
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key != "__metadata__":
                    start = 8 + size + info["data_offsets"][0]
                    self._entry[key] = (path, start, info["shape"], DTYPES[info["dtype"]])
        self._open = ExitStack()

    def keys(self) -> set[str]:
        return set(self._entry)

    def get_slice(self, key: str) -> StoredTensor:
        if key not in self._entry:
            raise KeyError(f"checkpoint has no tensor named {key!r}")
        return StoredTensor(self, key, *self._entry[key])

    def mapped(self, key: str):
        """safetensors' slice of `key` (mapped until `release`)."""
        return self._open.enter_context(safe_open(self._entry[key][0], framework="pt")).get_slice(key)

    def release(self) -> None:
        """Drop the handles (and mapped pages) of the mapped slices read so far."""
        self._open.close()
        self._open = ExitStack()

    close = release


class StoredTensor:
    """One tensor of a checkpoint, read when indexed (`SafetensorsReader`)."""

    def __init__(self, reader: SafetensorsReader, key: str, path: Path, start: int, shape: list[int], dtype):
        self.reader, self.key, self.path, self.start, self.shape, self.dtype = reader, key, path, start, shape, dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        rows = self._rows(index)
        if rows is None:
            return self.reader.mapped(self.key)[index].clone()
        a, b = rows
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        out = torch.empty((b - a) * row, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.start + a * row)
            if f.readinto(out.numpy()) != out.numel():
                raise ValueError(f"{self.path.name}: {self.key} is cut short")
        return out.view(self.dtype).reshape(b - a, *self.shape[1:])

    def _rows(self, index) -> tuple[int, int] | None:
        """(first, end) rows when `index` takes whole rows, else None."""
        if not self.shape:
            return None
        first, *rest = index if isinstance(index, tuple) else (index,)
        if not isinstance(first, slice) or first.step not in (None, 1):
            return None
        whole = all(
            isinstance(r, slice) and r.step in (None, 1) and r.indices(n)[:2] == (0, n)
            for r, n in zip(rest, self.shape[1:])
        )
        if not whole or len(rest) >= len(self.shape):
            return None
        a, b, _ = first.indices(self.shape[0])
        return a, max(a, b)


def load_into(
    module: nn.Module,
    reader: SafetensorsReader,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    skip: set[str] = frozenset(),
    key_of=lambda name: name,
    loaded=lambda owner: None,
) -> None:
    """Replace every parameter of `module` (named after checkpoint keys) by this rank's slice.

    NOTE: `module` is expected to live on the meta device; nothing full-size is ever built.
    Parameters named in `skip` are left alone (the caller ties them); `key_of` maps a parameter
    name to its checkpoint key where the two differ. `loaded(owner)` runs after each piece is in place
    (the loader quantizes a layer there, so the whole model is never held unquantized). Parameters load
    largest first.
    """
    keys = reader.keys()
    # the largest first: their transients (an LM head's stored form beside its packed copy) come before the
    # rest of the model is resident, which kept the peak of a 1.5B model's load 100 MB higher
    for name, param in sorted(module.named_parameters(remove_duplicate=False), key=lambda p: -p[1].numel()):
        if name in skip:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        parent = owner_name.rpartition(".")[0]

        def key(part: str | None, name=name, parent=parent, leaf=leaf) -> str:
            return key_of(name if part is None else f"{parent}.{part}.{leaf}")

        def get(part: str | None, suffix: str = "") -> object:
            return reader.get_slice(key(part) + suffix)

        parts = [p for p, _ in owner.parts] if hasattr(owner, "parts") else [None]
        forms = {stored_form(key(p), keys) for p in parts}
        if "int8" in forms and getattr(owner, "quantizable", False):
            owner.quantizable = "int8"  # stored at 5-8 bits: int4 would lose them (Q4_K_M keeps such at Q6_K)
        both = forms == {"int4", "int8"}
        form = "int8" if both else forms.pop() if len(forms) == 1 else "mixed"
        if both:  # siblings stored in int4 and int8 forms: stacked in the int8 one, without loss
            as_int8: dict[str | None, dict[str, torch.Tensor]] = {}  # each part read and converted once

            def get(part: str | None, suffix: str, get=get, key=key, as_int8=as_int8) -> torch.Tensor:
                if part not in as_int8:
                    f = stored_form(key(part), keys)
                    as_int8[part] = int8_form(f, {s: get(part, s)[:] for s in SUFFIXES[f]})
                return as_int8[part][suffix]

        if form == "mixed":  # merged siblings, some stored quantized and some not: each dequantized, then stacked

            def get(part: str | None, get=get, key=key) -> torch.Tensor:
                f = stored_form(key(part), keys)
                return get(part)[:] if f is None else dequantize(f, {s: get(part, s)[:] for s in SUFFIXES[f]})

        elif form is not None:  # a quantized form instead of the weight: parallel.stored.quantize finishes it
            pieces = {s: owner.shard(leaf + s, lambda part, s=s: get(part, s)) for s in SUFFIXES[form]}
            owner.stored = (form, {s: t.to(device=device) for s, t in pieces.items()})
            del pieces  # the stored dict holds the only references: `from_stored` may free parts early
            delattr(owner, leaf)
            reader.release()
            loaded(owner)
            continue
        value = owner.shard(leaf, get) if hasattr(owner, "shard") else get(None)[:]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: checkpoint slice has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
            )
        setattr(owner, leaf, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
        reader.release()
        loaded(owner)


SUFFIXES = {"int4": ("_int4", "_scale", "_low"), "int8": ("_int8", "_scale", "_low")}


def stored_form(key: str, keys: set[str]) -> str | None:
    """ "int4" or "int8" where the checkpoint holds `key` in that quantized form (`model.gguf_quant`)."""
    if key in keys:
        return None
    return next((form for form, suffixes in SUFFIXES.items() if key + suffixes[0] in keys), None)
