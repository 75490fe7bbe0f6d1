"""Quantized weights for the tensor-parallel linear layers and the LM head (`--quantize int8|int4`).

Each rank quantizes its own shard after loading, so a row-parallel layer's scales are those of its own
columns (tensor-parallel sizes agree to within the quantization error, not bit for bit). Norms stay in
the compute dtype, and so does the input embedding unless the checkpoint stores it quantized
(`model.gguf_quant`: then its rows are dequantized on lookup, `parallel.stored.QuantRows`); the LM head
is always int8 (it is the largest matmul of a small model, and llama.cpp keeps it at 6 bits or more too).

- int8: on CPU, our kernel once `use_native` has named its instruction set: GGUF's Q8_0 (one fp16 scale per
  32 columns, absmax / 127), as stored or made so (`quantize_blocks`), int8 levels x int8 activations.
  Without it (no C++ compiler, or a width off a multiple of 32), one scale per output row (`quantize_rows`;
  Q8_0 re-quantized so) through FBGEMM's dynamically quantized linear (`quantized::linear_dynamic`), made
  accurate by `dynamic_int8` (two passes, per-row ranges; each row's result independent of the others').
  `aten._weight_int8pack_mm` and `aten._int_mm` were slower than fp32 everywhere (README, issue 15). torch
  marks its quantized tensor type deprecated; torch is pinned.
- int4: groups of `GROUP` input columns share a scale and an offset (asymmetric, 16 levels). On CPU the
  matmul is our own kernel (`model.kernels`: int8 activations, integer dot products, AVX-512 VNNI,
  AVX-VNNI or AVX2 chosen at run time) once `use_native` has named its instruction set; without it (no C++ compiler),
  `aten._weight_int4pack_mm_for_cpu` with bf16 activations, 2-3x slower.
- int6 (our kernel only): weights stored at 5-6 bits (GGUF's Q6_K, Q5_0, Q5_1, Q5_K: `model.gguf_quant`'s
  int8 form) keep their levels, group scales and offsets as they are, 64 levels per group of 16; without
  our kernel they are re-quantized to int8 rows.
- Q6_K and Q4_K tensors take our kernel's layouts of those forms (`sub_scales`: 8-bit codes times factors
  per 256 columns, fewer bytes than fp16 scales per group).
On other devices both dequantize inside the matmul (the compiled CUDA step fuses it). `parallel.stored`
makes these layers from what the loader read.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import VocabParallelEmbedding
from parallel.state import get_tp

GROUP = 32  # int4 group size: GGUF's 4-bit block (Q4_0, Q4_1, Q4_K sub-blocks), so those load as they are
FP16_MAX = 65504.0  # our kernel keeps scales and lows in fp16
_native: str | None = None  # instruction set of our kernels (`torch.ops.nlg`), None until `use_native`


def native() -> str | None:
    """The instruction set `use_native` named, or None."""
    return _native


def use_native(isa: str | None) -> None:
    """Route the int4 and int6 layers made from now on to our kernels (`model.kernels`, loaded as
    `torch.ops.nlg`) with instruction set `isa`, or (None) int4 to torch's kernel and 5-6 bit forms to int8."""
    global _native
    _native = isa


def _ours(weight: torch.Tensor) -> bool:
    """Whether our kernels can take this (out, in) weight's levels: on a CPU after `use_native`, `in` a multiple
    of GROUP."""
    return weight.device.type == "cpu" and bool(_native) and weight.shape[1] % GROUP == 0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), fp32 scale (out,)): weight ~ int8 * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), scale (out, in // GROUP)): GGUF's Q8_0, weight ~ int8 * scale per block of GROUP
    columns, the scale absmax / 127 rounded to fp16 (as Q8_0 stores it, and our kernel's layout holds it)."""
    out, width = weight.shape
    w = weight.float().reshape(out, width // GROUP, GROUP)
    scale = (w.abs().amax(-1) / 127).half().float()
    levels = torch.where(scale[..., None] > 0, w / scale.clamp(min=1e-30)[..., None], 0)
    return torch.round(levels).clamp(-127, 127).to(torch.int8).reshape(out, width), scale


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 form an `Int8Linear` runs best: per 32 columns on our kernel (a CPU after `use_native`, the
    width a multiple of 32: `quantize_blocks`), else per row (`quantize_rows`)."""
    if _ours(weight):
        return quantize_blocks(weight)
    return quantize_rows(weight)


def quantize_groups(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 levels 0..15 (out, in), scale and low (out, in // group)): weight ~ levels * scale + low."""
    out, width = weight.shape
    w = weight.float().reshape(out, width // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    levels = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return levels.reshape(out, width), scale, low


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', mid, half) with x = mid + half * x' and every row of x' spanning exactly [-1, 1]."""
    low, high = x.aminmax(dim=1, keepdim=True)
    mid, half = (high + low) / 2, ((high - low) / 2).clamp(min=1e-30)
    return ((x - mid) / half).contiguous(), mid, half


def dynamic_int8(x: torch.Tensor, packed, row_sums: torch.Tensor) -> torch.Tensor:
    """x @ W.T for fp32 rows x through FBGEMM's int8 kernel, accurate to ~14 bits of the activations.

    FBGEMM quantizes activations to 7 bits with one range per call: over a whole prompt, whose first
    token has massive activations, that alone took SmolLM2's WikiText perplexity from 13.4 to 32.6, and
    even one range per row left +4-10%. So each row is mapped onto [-1, 1] (x = mid + half * x'; the
    product is affine in each row: W x = half * W x' + mid * W 1, W 1 being the weight's row sums), and
    the rounding FBGEMM applies to x' (the same dynamic quantization, reproduced by
    `quantize_per_tensor_dynamic`) is multiplied in a second call, mapped the same way."""
    unit, mid, half = _unit_rows(x)
    rounded = torch.quantize_per_tensor_dynamic(unit, torch.quint8, True).dequantize()
    rest, rest_mid, rest_half = _unit_rows(unit - rounded)
    m = x.shape[0]
    if m <= 4:  # one call for both (measured: 0.66 ms against 1.28 for two at 8960 x 1536, one row)
        both = torch.ops.quantized.linear_dynamic(torch.cat([unit, rest]), packed, True)
        y, y_rest = both[:m], both[m:]
    else:
        y = torch.ops.quantized.linear_dynamic(unit, packed, True)
        y_rest = torch.ops.quantized.linear_dynamic(rest, packed, True)
    y = y * half
    y += y_rest * (rest_half * half)
    return y.addcmul_(mid + rest_mid * half, row_sums)


class Int8Linear(nn.Module):
    """x @ (q * scale).T for q int8 (out, in) with a scale per row (out,) or per 32 columns (out, in / 32: Q8_0's
    form, `quantize_blocks`). Per 32 columns on our kernel (CPU, `takes`; packed `CHUNK` rows at a time), per
    row through FBGEMM on a CPU; on other devices either form as a dequantizing matmul."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features = rows = q.shape[0]
        self.nbytes = q.numel() + scale.numel() * 4
        if self.takes(q, scale):
            self.isa, self.precise = _native, False
            tiles = torch.empty(-(-rows // TILE_ROWS), q.shape[1] // GROUP, EIGHT_BYTES, dtype=torch.uint8)
            for a in range(0, rows, CHUNK):
                chunk = scale[a : a + CHUNK]
                packed = torch.ops.nlg.pack(q[a : a + CHUNK], chunk, torch.zeros_like(chunk), 8)
                tiles[a // TILE_ROWS : (a + CHUNK) // TILE_ROWS] = packed
            self.register_buffer("tiles", tiles)
            self.nbytes = tiles.numel()
        elif q.device.type != "cpu":
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
        elif scale.dim() == 2:
            raise ValueError("int8 scales per 32 columns run on our kernel only (Int8Linear.takes)")
        else:
            zeros = torch.zeros(q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch's quantized tensors are deprecated; torch is pinned
                warnings.simplefilter("ignore")
                qt = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
                self.packed = torch.ops.quantized.linear_prepack(qt, None)
            self.register_buffer("row_sums", q.sum(dim=1, dtype=torch.float32) * scale)  # exact: |sum| < 2^24

    @staticmethod
    def takes(q: torch.Tensor, scale: torch.Tensor) -> bool:
        """Whether our kernel computes these levels and scales: on a CPU after `use_native`, scales per 32
        columns within fp16."""
        return _ours(q) and scale.shape == (q.shape[0], q.shape[1] // GROUP) and _fits_fp16(scale, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if hasattr(self, "tiles"):
            out = torch.ops.nlg.matmul(flat, self.tiles, self.out_features, self.isa, self.precise).to(x.dtype)
        elif hasattr(self, "packed"):
            out = dynamic_int8(flat.float(), self.packed, self.row_sums).to(x.dtype)
        else:
            n, k = self.q.shape
            scale = self.scale.to(flat.dtype).reshape(n, -1)
            w = (self.q.to(flat.dtype).reshape(n, scale.shape[1], -1) * scale[..., None]).reshape(n, k)
            out = F.linear(flat, w)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """x @ (levels * scale + low).T, `GROUP` input columns per scale; `levels` one per byte (out, in), or
    with `two_per_byte` as stored (out, in / 2; `unpack`), which our kernel packs without unpacking: in
    Q4_K's own layout where `sub_scales` finds its codes (4.625 bits a weight, the scales exact), else with
    fp16 scales and lows (5)."""

    def __init__(self, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, two_per_byte: bool = False):
        super().__init__()
        self.out_features = levels.shape[0]
        self.group = levels.shape[1] * (2 if two_per_byte else 1) // scale.shape[1]
        cpu = levels.device.type == "cpu"
        if cpu and _native and self.group == GROUP:
            sub = sub_scales(scale, low, 4)
            if sub is not None or _fits_fp16(scale, low):
                self.isa, self.precise = _native, False
                tiles = torch.ops.nlg.pack_sub(levels, *sub) if sub else torch.ops.nlg.pack(levels, scale, low, 4)
                self.register_buffer("tiles", tiles)
                self.nbytes = self.tiles.numel()
                return
        levels = unpack(levels) if two_per_byte else levels
        if cpu:
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
        if hasattr(self, "tiles"):
            out = torch.ops.nlg.matmul(flat, self.tiles, self.out_features, self.isa, self.precise).to(x.dtype)
        elif hasattr(self, "packed"):
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.bfloat16(), self.packed, self.group, self.scale_zero)
            out = out.to(x.dtype)
        else:
            n, k = self.levels.shape
            w = self.levels.reshape(n, k // self.group, self.group).to(flat.dtype)
            w = w * self.scale.to(flat.dtype)[..., None] + self.low.to(flat.dtype)[..., None]
            out = F.linear(flat, w.reshape(n, k))
        return out.reshape(*x.shape[:-1], self.out_features)


def _fits_fp16(scale: torch.Tensor, low: torch.Tensor) -> bool:
    return bool(max(scale.abs().max(), low.abs().max()) < FP16_MAX)


class Int6Linear(nn.Module):
    """x @ (levels * scale + low).T for levels 0..63, 16 input columns per scale, on our kernel (CPU).

    Two packed layouts: the general one (an fp16 scale and low per 16 columns: 8 bits a weight), and Q6_K's
    own where a stored form is it (`sub_scales`: levels -32..31, lows 0, each scale an int8 times one factor
    per 256 columns: 6.6 bits a weight, and the scales exact where fp16 rounds them)."""

    SPAN = 16

    def __init__(
        self,
        levels: torch.Tensor,
        scale: torch.Tensor | None,
        low: torch.Tensor | None,
        least: int = 0,
        sub: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """`levels` (rows, in) spanning `least`..`least` + 63 (as `fits` found them), `scale` and `low` per
        group of 16 or 32 columns, or (None, None and) `sub`: the int8 scales and per-256 factors. Converted
        and packed `CHUNK` rows at a time into the tiles (16 rows each), so the shifted levels and per-16
        scales of a 151936-row head are never whole: a whole-matrix conversion took 1.2 GB on top of
        Qwen2.5-1.5B's loaded weights."""
        super().__init__()
        self.out_features, self.isa, self.precise = levels.shape[0], _native, False
        rows, columns = levels.shape
        shape = (columns // SUPER_COLUMNS, SUB_BYTES[6]) if sub is not None else (columns // GROUP, 512)
        tiles = torch.empty(-(-rows // TILE_ROWS), *shape, dtype=torch.uint8)
        for a in range(0, rows, CHUNK):
            shifted = levels[a : a + CHUNK].sub(least).view(torch.uint8)  # int8 wraps: 0..63 mod 256
            if sub is not None:
                packed = torch.ops.nlg.pack_sub(shifted, sub[0][a : a + CHUNK], sub[1][a : a + CHUNK])
            else:
                chunk_scale, chunk_low = self._spans(scale[a : a + CHUNK], low[a : a + CHUNK], columns, least)
                packed = torch.ops.nlg.pack(shifted, chunk_scale, chunk_low, 6)
            tiles[a // TILE_ROWS : (a + CHUNK) // TILE_ROWS] = packed
        self.register_buffer("tiles", tiles)
        self.nbytes = self.tiles.numel()

    @classmethod
    def _spans(cls, scale: torch.Tensor, low: torch.Tensor, columns: int, least: int) -> tuple:
        """The scale and low of each span of 16 columns, the levels' `least` folded into the lows."""
        repeat = columns // scale.shape[1] // cls.SPAN
        scale = scale.repeat_interleave(repeat, 1)
        return scale, low.repeat_interleave(repeat, 1) + least * scale

    @classmethod
    def fits(cls, levels: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple | None:
        """The arguments of an `Int6Linear` for a stored int8 form of groups of 16 or 32 whose levels span at
        most 64 values (their least folded into the lows, which must stay within fp16), in Q6_K's layout where
        `sub_scales` finds it, or None (then not this layer's form)."""
        group = levels.shape[1] // scale.shape[1]
        if not _ours(levels) or group not in (16, 32):
            return None
        least, most = (int(v) for v in levels.aminmax())
        if most - least > 63:
            return None
        if least >= -32 and most <= 31 and (sub := sub_scales(scale, low)) is not None:
            return levels, None, None, -32, sub
        if not _fits_fp16(scale, low + least * scale):  # per group: each span of 16 repeats its group's values
            return None
        return levels, scale, low, least

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.nlg.matmul(flat, self.tiles, self.out_features, self.isa, self.precise).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


SUPER_COLUMNS = 256  # columns per factor of the K-quants' scales (their super-block)
SUB_BYTES = {6: 3392, 4: 2368}  # a tile's bytes per super-block in our kernel's Q6_K and Q4_K layouts (Sub)
EIGHT_BYTES = 544  # a tile's bytes per block of 32 columns in our kernel's int8 layout (Eight)


def sub_scales(scale: torch.Tensor, low: torch.Tensor, bits: int = 6) -> tuple[torch.Tensor, ...] | None:
    """The codes and per-256-column factors that make the scales and lows exactly, as GGUF's K-quants store
    them, or None where they are not so made. bits 6 (Q6_K: scales per 16 columns, lows 0): (sc int8, d) with
    scale = d * sc, llama.cpp's quantizer coding each 256 columns' largest scale -128; bits 4 (Q4_K: per 32):
    (sc uint8, d, mn uint8, f) with scale = d * sc, low = f * mn, the largest codes 63 and d, f fp16 values."""
    if bits == 6:
        return None if bool(low.any()) else _codes(scale, SUPER_COLUMNS // Int6Linear.SPAN, -128, torch.int8)
    found = [_codes(v, SUPER_COLUMNS // GROUP, 63, torch.uint8) for v in (scale, low)]
    if None in found or any(not torch.equal(f.half().float(), f) for _, f in found):
        return None
    return (*found[0], *found[1])


def _codes(v: torch.Tensor, per: int, top: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes (rows, groups), factors (rows, groups / per)) with each run of `per` groups' factor times its
    codes equal to v exactly, the run's largest value in magnitude coded `top`; None where not so, or where a
    code leaves `dtype`. Found `CHUNK` rows at a time: the fp32 temporaries of a whole LM head were the 1.5B
    model's load peak."""
    rows, groups = v.shape
    if groups % per:
        return None
    info = torch.iinfo(dtype)
    codes, factors = torch.empty(rows, groups, dtype=dtype), torch.empty(rows, groups // per)
    for a in range(0, rows, CHUNK):
        runs = v[a : a + CHUNK].reshape(-1, groups // per, per)
        f = runs.gather(-1, runs.abs().argmax(-1, keepdim=True)) / top  # (rows, supers, 1)
        c = torch.where(f != 0, runs / torch.where(f != 0, f, 1), 0).round()
        if bool((c < info.min).any() or (c > info.max).any()) or not torch.equal(f * c, runs):
            return None
        codes[a : a + CHUNK], factors[a : a + CHUNK] = c.to(dtype).reshape(-1, groups), f.reshape(-1, groups // per)
    return codes, factors


CHUNK = 8192  # rows converted at a time: a 151936-row LM head is never whole in fp32 more than once
TILE_ROWS = 16  # output rows per tile of our kernel's packed layout (CHUNK is a multiple)


def quantized(weight: torch.Tensor, mode: str) -> nn.Module:
    """The int8 or int4 form of this rank's `weight` (out, in)."""
    return quantized_by_chunk(lambda a, b: weight[a:b], weight.shape, mode)


def quantized_by_chunk(rows, shape: torch.Size, mode: str) -> nn.Module:
    """The int8 or int4 layer of an (out, in) weight whose fp32 rows a..b are `rows(a, b)`."""
    if mode == "int4" and shape[1] % GROUP:  # a row-parallel split must fall on group boundaries
        tp = get_tp().size
        full = shape[1] * tp
        valid = [n for n in range(1, 65) if full % (n * GROUP) == 0]
        raise ValueError(
            f"--quantize int4: {full} input features split {tp} ways do not fall on groups of {GROUP}; "
            f"tensor-parallel sizes that do: {', '.join(map(str, valid)) or 'none'}"
        )
    method = quantize_int8 if mode == "int8" else quantize_groups
    parts = [method(rows(a, min(a + CHUNK, shape[0]))) for a in range(0, shape[0], CHUNK)]
    whole = [torch.cat(p) for p in zip(*parts)]
    return Int8Linear(*whole) if mode == "int8" else Int4Linear(*whole)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int4 levels stored two per byte (column 2j low nibble, 2j + 1 high) as one uint8 per level."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every layer's parameters (tied ones once) and its kernel's
    weights (quantized or packed: each kernel says its `nbytes`), but not the input embeddings, of which a
    step reads one row per token (a head tied to one is counted as the head)."""
    lookups = {
        id(m) for e in model.modules() if isinstance(e, (nn.Embedding, VocabParallelEmbedding)) for m in e.modules()
    }
    layers = [m for m in model.modules() if id(m) not in lookups]
    params = {id(p): p for m in layers for p in m.parameters(recurse=False)}.values()
    return sum(p.numel() * p.element_size() for p in params) + sum(getattr(m, "nbytes", 0) for m in layers)
