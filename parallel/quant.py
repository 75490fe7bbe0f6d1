"""Weight-only quantization of the tensor-parallel linear layers and the LM head (`--quantize int8|int4`).

Each rank quantizes its own shard after loading, so a row-parallel layer's scales are those of its own
columns (tensor-parallel sizes agree to within the quantization error, not bit for bit). Norms and the
input embedding stay in the compute dtype; the LM head is always int8 (it is the largest matmul of a
small model, and llama.cpp keeps it at 6 bits or more too).

- int8: one scale per output row (absmax / 127). On CPU the matmul is FBGEMM's dynamically quantized
  linear (`quantized::linear_dynamic`): activations are quantized per call, per tensor, to 7 bits, so a
  row's result depends slightly on the other rows in the same step. Measured on a 2-core AVX2 CPU it is
  7-14x faster than fp32 on large matrices, where `aten._weight_int8pack_mm` and `aten._int_mm` were
  slower than fp32 (README, issue 15). torch marks its quantized tensor type deprecated; torch is pinned.
- int4: groups of `GROUP` input columns share a scale and an offset (asymmetric, 16 levels), through
  `aten._weight_int4pack_mm_for_cpu` with bf16 activations (its vectorized path on AVX2).
On other devices both dequantize inside the matmul (the compiled CUDA step fuses it).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from model.config import QUANTIZATIONS as MODES
from parallel.state import get_tp

GROUP = 32  # int4 group size: measured against 64 on SmolLM2 (README)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), fp32 scale (out,)): weight ~ int8 * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_groups(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 levels 0..15 (out, in), scale and low (out, in // group)): weight ~ levels * scale + low."""
    out, width = weight.shape
    w = weight.float().reshape(out, width // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    levels = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return levels.reshape(out, width), scale, low


class Int8Linear(nn.Module):
    """x @ (q * scale[:, None]).T for q int8 (out, in)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features = q.shape[0]
        self.nbytes = q.numel() + scale.numel() * 4
        if q.device.type == "cpu":
            zeros = torch.zeros(q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch's quantized tensors are deprecated; torch is pinned
                warnings.simplefilter("ignore")
                qt = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
                self.packed = torch.ops.quantized.linear_prepack(qt, None)
        else:
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if hasattr(self, "packed"):
            out = torch.ops.quantized.linear_dynamic(flat.float().contiguous(), self.packed, True).to(x.dtype)
        else:
            out = F.linear(flat, self.q.to(flat.dtype) * self.scale.to(flat.dtype)[:, None])
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """x @ (levels * scale + low).T, `GROUP` input columns per scale."""

    def __init__(self, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
        super().__init__()
        self.out_features, self.group = levels.shape[0], levels.shape[1] // scale.shape[1]
        if levels.device.type == "cpu":
            # the kernel's form: w = (level - 8) * scale + zero, scales and zeros as (groups, out, 2)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 1)
            zero = low + 8 * scale
            self.register_buffer("packed", packed)
            self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16())
        else:
            self.register_buffer("levels", levels)
            self.register_buffer("scale", scale)
            self.register_buffer("low", low)
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if hasattr(self, "packed"):
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.bfloat16(), self.packed, self.group, self.scale_zero)
            out = out.to(x.dtype)
        else:
            n, k = self.levels.shape
            w = self.levels.reshape(n, k // self.group, self.group).to(flat.dtype)
            w = w * self.scale.to(flat.dtype)[..., None] + self.low.to(flat.dtype)[..., None]
            out = F.linear(flat, w.reshape(n, k))
        return out.reshape(*x.shape[:-1], self.out_features)


def quantized(weight: torch.Tensor, mode: str) -> nn.Module:
    """The int8 or int4 form of this rank's `weight` (out, in)."""
    if mode == "int8":
        return Int8Linear(*quantize_rows(weight))
    if weight.shape[1] % GROUP:  # a row-parallel split must fall on group boundaries
        tp = get_tp().size
        full = weight.shape[1] * tp
        valid = [n for n in range(1, 65) if full % (n * GROUP) == 0]
        raise ValueError(
            f"--quantize int4: {full} input features split {tp} ways do not fall on groups of {GROUP}; "
            f"tensor-parallel sizes that do: {', '.join(map(str, valid)) or 'none'}"
        )
    return Int4Linear(*quantize_groups(weight))


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize in place every layer marked `quantizable` (the column- and row-parallel linears, the LM
    head; a mark of "int8" caps the mode). Mode "none": the model as it is."""
    if mode not in MODES:
        raise ValueError(f"--quantize {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    for layer in list(model.modules()):
        mark = getattr(layer, "quantizable", False)
        if mark:
            layer.quantized = quantized(layer.weight.data, "int8" if mark == "int8" else mode)
            del layer.weight
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a step reads: the parameters (tied ones once) and the quantized weights."""
    params = {id(p): p for p in model.parameters()}.values()
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    return sum(p.numel() * p.element_size() for p in params) + packed
