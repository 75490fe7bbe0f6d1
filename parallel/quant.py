"""Weight-only int8 quantization of the tensor-parallel linear layers (`--quantize int8`).

Each rank quantizes its own shard after loading: one scale per output row (absmax / 127), weights stored
as int8, so a decode step reads a quarter of the fp32 bytes. The matmul is torch's own packed kernel,
`aten._weight_int8pack_mm` (activations in the compute dtype, int8 weights, per-row scales); on a device
where it is missing the weights are dequantized inside the matmul instead. Norms, embeddings and the LM
head stay in the compute dtype. A row-parallel layer's scales are those of this rank's columns, so
tensor-parallel sizes agree to within the quantization error, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), scale (out,) in the weight's dtype): weight ~ int8 * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (qweight * scale).T for x (..., in), through the packed int8 kernel."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.device.type == "cpu":
        out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), qweight, scale)
    else:  # dequantized in the matmul (the compiled CUDA step fuses it)
        out = F.linear(flat, qweight.to(flat.dtype) * scale[:, None])
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize every column- and row-parallel linear layer of `model` in place (mode "none": as it is)."""
    if mode not in MODES:
        raise ValueError(f"--quantize {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    for layer in model.modules():
        if getattr(layer, "quantizable", False):  # the column- and row-parallel linears (parallel.layers)
            q, scale = quantize_rows(layer.weight.data)
            del layer.weight
            layer.register_buffer("qweight", q)
            layer.register_buffer("scale", scale)
    return model
