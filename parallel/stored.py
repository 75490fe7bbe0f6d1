"""What the loader read, made into the layers' kernels: weights stored quantized (`model.gguf_quant`'s
forms) taken as they are where a kernel computes them (`from_stored`; siblings of one merged matmul stored
in different forms each in its own, `Stacked`), else dequantized or re-quantized; full-precision weights
quantized for `--quantize int8|int4` (`finish`, `quantize`). The layers themselves are `parallel.quant`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.quant import (
    CHUNK,
    GROUP,
    Int4Linear,
    Int6Linear,
    Int8Linear,
    native,
    quantized,
    quantized_by_chunk,
    unpack,
)


def int8_form(form: str, t: dict[str, torch.Tensor], span: int = 16) -> dict[str, torch.Tensor]:
    """A stored form (`model.gguf_quant`) as the int8 form with a scale and low per `span` columns, the same
    weights exactly: int4 levels 0..15 are int8 levels, and a group's scale and low repeat over its spans.
    Siblings stored in different forms (Q4_K_M's q, k at 4 bits and v at 6) stack this way without loss."""
    levels = unpack(t["_int4"]).to(torch.int8) if form == "int4" else t["_int8"]
    repeat = levels.shape[1] // t["_scale"].shape[1] // span
    return {
        "_int8": levels,
        "_scale": t["_scale"].repeat_interleave(repeat, 1),
        "_low": t["_low"].repeat_interleave(repeat, 1),
    }


def dequantize(form: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight of a stored quantized form (`model.gguf_quant`): levels * scale + low, per group."""
    return torch.cat(
        [_dequantize(form, {k: v[a : a + CHUNK] for k, v in t.items()}) for a in range(0, len(t["_scale"]), CHUNK)]
    )


def _dequantize(form: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    levels = (unpack(t["_int4"]) if form == "int4" else t["_int8"]).float()
    n, k = levels.shape
    w = levels.reshape(n, t["_scale"].shape[1], -1) * t["_scale"][..., None] + t["_low"][..., None]
    return w.reshape(n, k)


def from_stored(form: str, t: dict[str, torch.Tensor], mode: str, parts: list[int] | None = None) -> nn.Module:
    """The `mode` layer for a stored form: taken as it is where a kernel computes it (int4 groups of GROUP
    for mode int4, or any mode on our kernel; on our kernel 5-6 bit int8 forms as int6, Q8_0 as int8), else
    re-quantized.
    A form taken in Q6_K's layout loses its fp32 scales and lows from `t` (its codes replace them). `parts`:
    the rows of each sibling a merged layer stacks (`stacked`)."""
    if form == "int8" and parts and (split := stacked(t, parts, mode)) is not None:
        return split
    int4_groups = form == "int4" and t["_scale"].shape[1] * GROUP == t["_int4"].shape[1] * 2
    if int4_groups and (mode == "int4" or native()):
        return Int4Linear(t["_int4"], t["_scale"], t["_low"], two_per_byte=True)
    six = Int6Linear.fits(t["_int8"], t["_scale"], t["_low"]) if form == "int8" else None
    eight = per_32(t["_int8"], t["_scale"], t["_low"]) if form == "int8" and six is None else None
    if eight is not None:  # Q8_0 as stored
        return Int8Linear(t["_int8"], eight)
    if six is not None and len(six) == 5:  # Q6_K's layout: the codes replace the fp32 scales and lows
        del t["_scale"], t["_low"]  # freed before packing (117 MB for the 1.5B model's head, at its load's peak)
    if six is not None:
        return Int6Linear(*six)
    rows = t["_int4" if form == "int4" else "_int8"]
    shape = (rows.shape[0], rows.shape[1] * (2 if form == "int4" else 1))
    return quantized_by_chunk(lambda a, b: _dequantize(form, {k: v[a:b] for k, v in t.items()}), shape, mode)


def per_32(levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor | None:
    """The scales per 32 columns of an int8 form without lows whose groups are 32 columns, or 16 in pairs of
    equal scales (`int8_form`'s), where our int8 kernel takes them (`Int8Linear.takes`); else None."""
    if bool(low.any()):
        return None
    if levels.shape[1] == scale.shape[1] * 16 and torch.equal(scale[:, 0::2], scale[:, 1::2]):
        scale = scale[:, 0::2]
    if levels.shape[1] != scale.shape[1] * GROUP or not Int8Linear.takes(levels, scale):
        return None
    return scale


class Stacked(nn.Module):
    """Row blocks of one matmul in different forms, each on its own kernel, the outputs side by side:
    Q4_K_M's q and k stored at 4 bits and v at 6 (stacked as int6 they read 8 bits a weight)."""

    def __init__(self, kernels: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(kernels)
        self.out_features = sum(k.out_features for k in kernels)

    @property
    def precise(self) -> bool:
        return self.parts[0].precise

    @precise.setter
    def precise(self, value: bool) -> None:
        for k in self.parts:
            k.precise = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([k(x) for k in self.parts], -1)


def stacked(t: dict[str, torch.Tensor], parts: list[int], mode: str) -> Stacked | None:
    """Siblings stacked in the int8 form (`int8_form`, scales per 16 columns) each in the form it was stored
    in, on our kernels: the runs of siblings whose levels are 0..15 with one scale and low per 32 columns as
    int4, the others as the int8 form gives them; None where all take one form, or where a part would not run
    on our kernels (then the merged matmul is re-quantized whole: `quantized_by_chunk`)."""
    if not native() or len(parts) < 2 or t["_int8"].shape[1] % GROUP:
        return None
    runs, at = [], 0  # (first row, rows, int4?) of each run of siblings in one form
    for rows in parts:
        levels, scale, low = (t[s][at : at + rows] for s in ("_int8", "_scale", "_low"))
        four = scale.shape[1] * 16 == levels.shape[1] and bool((levels >= 0).all() and (levels <= 15).all())
        four = four and torch.equal(scale[:, 0::2], scale[:, 1::2]) and torch.equal(low[:, 0::2], low[:, 1::2])
        if runs and runs[-1][2] == four:
            runs[-1][1] += rows
        else:
            runs.append([at, rows, four])
        at += rows
    if len(runs) < 2:
        return None
    kernels = []
    for first, rows, four in runs:
        piece = {s: v[first : first + rows] for s, v in t.items()}
        if four:
            levels = piece["_int8"].view(torch.uint8)
            kernels.append(Int4Linear(levels, piece["_scale"][:, 0::2], piece["_low"][:, 0::2]))
        else:
            kernels.append(from_stored("int8", piece, mode))
    return Stacked(kernels) if all(hasattr(k, "tiles") for k in kernels) else None


class QuantRows(nn.Module):
    """Embedding rows kept in their stored quantized form, dequantized only where looked up."""

    def __init__(self, form: str, t: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.form, self.dtype = form, dtype
        for suffix, tensor in t.items():
            self.register_buffer(suffix.lstrip("_"), tensor)
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        levels = self.int4[flat] if self.form == "int4" else self.int8[flat]
        rows = _dequantize(self.form, {f"_{self.form}": levels, "_scale": self.scale[flat], "_low": self.low[flat]})
        return rows.to(self.dtype).reshape(*ids.shape, -1)


def quantize(model: nn.Module, mode: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`finish` every layer of `model` (mode "none": only those loaded in a quantized form); the loader
    has checked `mode` against `parallel.forms.QUANTIZATIONS`."""
    for layer in list(model.modules()):
        finish(layer, mode, dtype)
    return model


def finish(layer: nn.Module, mode: str, dtype: torch.dtype) -> None:
    """Quantize a layer marked `quantizable` (the column- and row-parallel linears, the LM head; a mark
    of "int8" caps the mode: the head's, and the one the loader puts on weights stored as int8), or
    finish one loaded in a quantized form (`layer.stored`): dequantized to `dtype` for mode "none", an
    embedding's rows kept quantized. A layer already finished, or not loaded yet, is left as it is. A layer
    marked `precise_inputs` (q/k/v) has our kernel multiply its activations' int8 rounding too."""
    mark = getattr(layer, "quantizable", False)
    stored = layer.__dict__.pop("stored", None)
    target = "int8" if mark == "int8" else mode
    weight = layer._parameters.get("weight")
    if stored is not None and mode == "none":
        layer.weight = nn.Parameter(dequantize(*stored).to(dtype), requires_grad=False)
    elif stored is not None and not mark:
        layer.rows = QuantRows(*stored, dtype)
    elif stored is not None:
        parts = [sum(b - a for a, b in ranges) for _, ranges in getattr(layer, "parts", [])]
        layer.kernel = from_stored(*stored, target, parts)
    elif mark and mode != "none" and weight is not None and weight.device.type != "meta":
        layer.kernel = quantized(weight.data, target)
        del layer.weight
    if hasattr(layer, "kernel") and hasattr(layer.kernel, "precise"):
        layer.kernel.precise = getattr(layer, "precise_inputs", False)
