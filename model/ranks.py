"""A model split over tensor-parallel ranks, driven from rank 0.

Rank 0 wraps its shard in `Leader`: every forward is first announced to the other ranks (the step
plan: token ids, positions, block tables, which cache), then run locally; the collectives inside the
layers meet the same calls on every rank. Ranks > 0 run `follow`, which repeats each announced
forward on their own shard and KV cache until rank 0 stops them. Sampling happens on rank 0 only.
"""

from __future__ import annotations

import torch
from torch import nn

from model.kv_cache import KVCache
from parallel.launch import follow_plans, send_plan


class Leader:
    """Rank 0's handle on its shard: call it like the model; it keeps the other ranks in step."""

    def __init__(self, model: nn.Module):
        self.model, self.config = model, model.config

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids, positions, cache: KVCache | None = None, blocks=None, logits_index=None):
        cpu = [None if t is None else t.cpu() for t in (input_ids, positions, blocks, logits_index)]
        send_plan((cache_spec(cache), *cpu))
        return self.model(input_ids, positions, cache, blocks, logits_index)


def cache_spec(cache: KVCache | None) -> tuple | None:
    """What a follower needs to mirror rank 0's cache: its identity and how it was made."""
    if cache is None:
        return None
    return (id(cache), *cache.args)


def follow(model: nn.Module, device: torch.device) -> None:
    """Ranks > 0: repeat rank 0's forwards on this shard until told to stop."""
    mirror: dict[str, object] = {"spec": None, "cache": None}

    @torch.inference_mode()
    def run(plan) -> None:
        spec, *tensors = plan
        if spec is not None and spec != mirror["spec"]:
            mirror["spec"], mirror["cache"] = spec, KVCache(*spec[1:], device)
        ids, positions, blocks, logits_index = (None if t is None else t.to(device) for t in tensors)
        model(ids, positions, mirror["cache"] if spec is not None else None, blocks, logits_index)

    follow_plans(run)


def follow_named(model: str, device: torch.device, dtype: torch.dtype, quantization: str = "none") -> None:
    """Ranks > 0 of the named model (or directory): load this rank's shard, then `follow`."""
    from model.loader import load_model
    from model.registry import resolve

    follow(load_model(resolve(model), dtype=dtype, device=device, quantization=quantization), device)
