"""Llama-family decoder: Llama, Mistral (no sliding window), Qwen2 (q/k/v bias), SmolLM.

RMSNorm, rotary embeddings (`rope_theta`), grouped-query attention, SwiGLU MLP, tied or untied
LM head. Parameter names are the Hugging Face checkpoint keys, so `parallel.weights.load_into`
needs no rename table; the two merged projections (`qkv_proj`, `gate_up_proj`) name the keys they
stack. Linear, embedding and head layers come from `parallel.layers`: at tensor-parallel size 1
they are plain layers; at size N each holds its shard: q/k/v, gate and up split by output rows
(`ColumnParallelLinear`), o and down by input columns with an all-reduce (`RowParallelLinear`), the
embedding and head by vocabulary rows (`parallel.layers`).
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kv_cache import NATIVE_QUERIES, Batch, KVCache, attend
from parallel.layers import (
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_column_parallel_linear,
    qkv_parallel_linear,
)
from parallel.state import get_tp
from parallel.stored import Stacked


class RMSNorm(nn.Module):
    """norm(x), or with `residual` the pair (norm(x + residual), x + residual): the sum is the next
    residual. `native_step` (set by the loader where our kernels run, fp32 on a CPU: their instruction
    set): one call of `torch.ops.nlg` instead of torch's several."""

    native_step: str | None = None

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.native_step:
            if residual is None:
                return torch.ops.nlg.rms_norm(x, self.weight, self.eps, self.native_step)
            return torch.ops.nlg.add_rms_norm(x, residual, self.weight, self.eps, self.native_step)
        if residual is None:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = x + residual
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), x


def rope_tables(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (max_position, head_dim), for the rotate-half layout of `transformers`:
    rope(x) = x * cos + roll(x, d/2) * sin_signed, where roll(x) = [x2, x1] and sin_signed = [-sin, sin]."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    angles = torch.outer(torch.arange(cfg.max_position, device=device).float(), inv_freq)  # (P, d/2)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([-angles.sin(), angles.sin()], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, native: str | None = None) -> torch.Tensor:
    """x: (B, T, heads, D); cos, sin_signed: (B, T, 1, D). `native`: in one call of ours, that ISA."""
    if native:
        return torch.ops.nlg.rope(x, cos, sin_signed, native)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


class Attention(nn.Module):
    """`qkv_proj` stacks the checkpoint's q_proj, k_proj and v_proj into one matmul."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.layer, self.head_dim = layer, d
        self.num_heads = h // get_tp().size  # this rank's heads (config keeps the totals)
        self.num_kv_heads = max(1, kv // get_tp().size)
        self.qkv_proj = qkv_parallel_linear(cfg.hidden_size, d, h, kv, cfg.attention_bias, separate=True)
        self.o_proj = RowParallelLinear(h * d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, batch: Batch, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, d)  # (B, T, H + 2*Hkv, D)
        qk = apply_rope(qkv[:, :, : h + kv], cos, sin, batch.native_step)  # q and k heads rotated together
        return self.o_proj(attend(qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + kv :], batch, cache, self.layer))


class MLP(nn.Module):
    """`gate_up_proj` stacks the checkpoint's gate_proj and up_proj into one matmul; `native_step` (as the
    norms'): silu(gate) * up in one call of ours."""

    native_step: str | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = merged_column_parallel_linear(
            cfg.hidden_size, cfg.intermediate_size, ["gate_proj", "up_proj"]
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.gate_up_proj(x)
        if self.native_step:
            return self.down_proj(torch.ops.nlg.silu_mul(both, self.native_step))
        gate, up = both.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """`native_step` (as the norms'): rows of up to NATIVE_QUERIES tokens whose keys and values sit in their
    home regions run the whole block in one call of ours (`torch.ops.nlg.block`: the same kernels in the
    same order, without the interpreter between them) where its four matmuls run our kernels at
    tensor-parallel size 1 (`native_weights`)."""

    native_step: str | None = None

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    @cached_property
    def native_weights(self) -> tuple[list[torch.Tensor], list[int], list[int], str] | None:
        """The qkv (its parts in their forms: `parallel.stored.Stacked`), o, gate_up and down matmuls' packed
        weights, output rows, activation modes and instruction set, when all run our kernels (with one
        instruction set) at tensor-parallel size 1; else None."""
        attn, mlp = self.self_attn, self.mlp
        layers = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        kernels = [getattr(layer, "kernel", None) for layer in layers]
        if get_tp().size > 1 or any(layer.bias is not None for layer in layers[1:]):
            return None
        kernels[:1] = kernels[0].parts if isinstance(kernels[0], Stacked) else kernels[:1]
        if not all(hasattr(k, "tiles") for k in kernels) or len({k.isa for k in kernels}) > 1:
            return None
        outs, precise = [k.out_features for k in kernels], [int(k.precise) for k in kernels]
        return [k.tiles for k in kernels], outs, precise, kernels[0].isa

    def forward(self, x, residual, cos, sin, batch: Batch, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the last block's output, residual: the stream before it (None at the first block, whose x is
        the embedding). Returns the same pair for the next block: each norm adds its input to the stream."""
        short = x.shape[1] <= NATIVE_QUERIES and cache is not None and isinstance(batch.home, slice)  # read in place
        weights = self.native_weights if self.native_step and short else None
        if weights and weights[3] == self.native_step:
            return self.native_block(x, residual, cos, sin, batch, cache)
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, batch, cache), residual)
        return self.mlp(h), residual

    def native_block(self, x, residual, cos, sin, batch: Batch, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        weights, outs, precise, isa = self.native_weights
        attn = self.self_attn
        key_cache, value_cache = cache.k[attn.layer], cache.v[attn.layer]
        keys, values = key_cache[batch.home, :, : batch.span], value_cache[batch.home, :, : batch.span]  # home regions
        return torch.ops.nlg.block(
            x,
            residual,
            self.input_layernorm.weight,
            self.post_attention_layernorm.weight,
            self.input_layernorm.eps,
            weights,
            outs,
            precise,
            attn.qkv_proj.bias,
            attn.num_heads,
            cos,
            sin,
            key_cache,
            value_cache,
            batch.where,
            keys,
            values,
            batch.lengths,
            attn.head_dim**-0.5,
            isa,
        )


class Body(nn.Module):
    """`model.*` in the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    native_step: str | None = None  # short rows' attention in our kernel (`model.kv_cache.attend`), as the norms

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.tied_keys = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}

    def init_buffers(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Tables that are computed, not loaded (in fp32, then cast like `transformers` does)."""
        self.cos, self.sin = (t.to(dtype) for t in rope_tables(self.config, device))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        blocks: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        fixed: bool = False,
    ) -> torch.Tensor:
        """input_ids, positions: (B, T); blocks: (B, N) each row's block table in `cache`. Returns logits
        (B, T, V), or (N, V) at `logits_index` (N,): positions in the flattened (B * T) batch, so that
        each row may ask for one or many. `fixed`: rows read every position of their N blocks and
        nothing is read back to the host (`Batch.fixed`: a CUDA graph can record it)."""
        batch = Batch.fixed(positions, blocks, cache) if fixed else Batch.make(positions, cache, blocks)
        batch.native_step = self.native_step
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # (B, T, 1, D)
        x, residual = self.model.embed_tokens(input_ids), None  # (B, T, hidden)
        for block in self.model.layers:
            x, residual = block(x, residual, cos, sin, batch, cache)
        if logits_index is not None:
            x, residual = x.flatten(0, 1)[logits_index], residual.flatten(0, 1)[logits_index]  # (N, hidden)
        return self.lm_head(self.model.norm(x, residual)[0])
