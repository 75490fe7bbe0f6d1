"""Per-rank sharded weight reading from safetensors.

`SafetensorsReader` opens a single `model.safetensors` or a sharded set listed in
`model.safetensors.index.json` and hands out lazy slices (`get_slice`), so a rank reads only the
rows or columns it keeps. `load_into` fills a module built on the meta device: each parallel
layer cuts its own piece (`shard`), every other parameter is read whole (replicated). Parameters are
named after checkpoint keys; a merged layer names the sibling keys it stacks (see `parallel.layers`).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class SafetensorsReader:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {directory}")
            weight_map = None
        self._stack = ExitStack()
        handles = {f: self._stack.enter_context(safe_open(directory / f, framework="pt")) for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in handles.items() for k in h.keys()}
        self._where = {k: handles[f] for k, f in weight_map.items()}

    def keys(self) -> set[str]:
        return set(self._where)

    def get_slice(self, key: str):
        if key not in self._where:
            raise KeyError(f"checkpoint has no tensor named {key!r}")
        return self._where[key].get_slice(key)

    def close(self) -> None:
        self._stack.close()


def load_into(
    module: nn.Module,
    reader: SafetensorsReader,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    skip: set[str] = frozenset(),
    key_of=lambda name: name,
) -> None:
    """Replace every parameter of `module` (named after checkpoint keys) by this rank's slice.

    NOTE: `module` is expected to live on the meta device; nothing full-size is ever built.
    Parameters named in `skip` are left alone (the caller ties them); `key_of` maps a parameter
    name to its checkpoint key where the two differ.
    """
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if name in skip:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        parent = owner_name.rpartition(".")[0]

        def get(part: str | None, name=name, parent=parent, leaf=leaf):
            return reader.get_slice(key_of(name if part is None else f"{parent}.{part}.{leaf}"))

        value = owner.shard(leaf, get) if hasattr(owner, "shard") else get(None)[:]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: checkpoint slice has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
            )
        setattr(owner, leaf, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
