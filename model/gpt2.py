"""GPT-2 decoder: learned positions, pre-LayerNorm blocks, GELU (tanh) MLP, fused `c_attn`.

Checkpoints store every linear as Conv1D, weight (in, out); the parallel layers are built with
`conv1d=True` and transpose while loading, so forward is the usual `x @ W.T`. Parameter names are
the Hugging Face keys (`transformer.h.0.attn.c_attn.weight`); the LM head is tied to `wte`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kv_cache import Batch, KVCache, attend
from parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    qkv_parallel_linear,
)
from parallel.state import get_tp


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    norm.requires_grad_(False)
    return norm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, cfg.head_dim
        self.num_heads = cfg.num_heads // get_tp().size  # this rank's heads
        self.c_attn = qkv_parallel_linear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_heads, bias=True, conv1d=True
        )
        self.c_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True, conv1d=True)

    def forward(self, x: torch.Tensor, batch: Batch, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)  # each (B, T, H, D)
        return self.c_proj(attend(q, k, v, batch, cache, self.layer))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True, conv1d=True)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, conv1d=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = _layer_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln_2 = _layer_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: Batch, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch, cache)
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    """`transformer.*` in the checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.wpe.requires_grad_(False)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = _layer_norm(cfg)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Body(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.tied_keys = {"lm_head.weight": "transformer.wte.weight"} if cfg.tie_word_embeddings else {}

    def init_buffers(self, device: torch.device | str, dtype: torch.dtype) -> None:
        pass  # positions are learned weights

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        blocks: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        fixed: bool = False,
    ) -> torch.Tensor:
        """As `model.llama.LlamaForCausalLM.forward`."""
        batch = Batch.fixed(positions, blocks, cache) if fixed else Batch.make(positions, cache, blocks)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, hidden)
        for block in self.transformer.h:
            x = block(x, batch, cache)
        if logits_index is not None:
            x = x.flatten(0, 1)[logits_index]  # (N, hidden)
        return self.lm_head(self.transformer.ln_f(x))
