"""Decode steps replayed from CUDA graphs.

A decode step of a small model is hundreds of tiny kernels: launched one by one from Python, the
launches, not the GPU, set the pace. A `GraphDecoder` captures the whole forward of one decode step
once per (rows, span) bucket and replays it, so a step costs one launch.

A captured graph reads fixed addresses and fixed shapes. So the inputs live in static buffers, the
rows of bucket B are the cache slots 0..B-1 (the batcher hands out the lowest free slot first, so
the running sequences sit in the low slots), and attention reads keys [0, span) under a mask
(`Batch.fixed`) instead of reading the longest position back to the host. A row with no sequence
decodes token 0 at the cache's last position, which no sequence attends to (a prompt plus its token
budget must fit the cache, and the last sampled token is at most fed once more, by a chained step
whose result is dropped), so it changes nothing.

Each step also takes every row's greedy token and writes it, with the next position, into the input
buffers. A step can then be *chained*: launched without any input from the host, while the host is
still reading the previous step's tokens (`Engine.launch`), so the host's work per token overlaps
the GPU's instead of adding to it.

With `capture=False` the same static step runs eagerly: that is how the CPU tests check it. With
`compile=True` the recorded step is first compiled by `torch.compile` with coordinate-descent tuning
on, under which Inductor turns a one-row matrix product into a reduction it fuses with the
element-wise work around it (the norm before, the activation or residual after) and tunes: fewer,
bandwidth-bound kernels per layer for single-stream decode.
"""

from __future__ import annotations

import torch
from torch import nn

from model.kv_cache import KVCache

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
MIN_SPAN = 256
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


def decode_step(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int):
    """One static decode step over rows 0..B-1: logits (B, V) and greedy tokens (B,); the inputs
    (B, 1) become each row's greedy token at the next position (the last position stays put)."""
    rows = torch.arange(ids.shape[0], device=ids.device)  # each row's one position
    logits = model(ids, positions, cache, None, logits_index=rows, span=span)
    tokens = logits.argmax(-1)
    ids.copy_(tokens[:, None])
    positions.copy_((positions + 1).clamp(max=cache.max_seq - 1))
    return logits, tokens


def compile_step():
    """`decode_step` through `torch.compile`. A fullgraph compile fails hard past dynamo's recompile limit
    (8 per function): one cache takes 6 (rows 1 or more x a span of 256, any span, the whole cache), and
    each new cache or model adds more, so the limit is raised while it runs."""
    step = torch.compile(decode_step, fullgraph=True, options=COMPILE_OPTIONS)

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=64):
            return step(*args)

    return run


class GraphDecoder:
    def __init__(self, model: nn.Module, cache: KVCache, capture: bool = True, compile: bool = False):
        self.model, self.cache, self.capture = model, cache, capture
        self.step = compile_step() if compile else decode_step
        self.rows = sorted({b for b in ROWS if b < cache.num_slots} | {cache.num_slots})
        self.device = cache.k[0].device
        self.inputs: dict[int, torch.Tensor] = {}  # rows -> (2, B, 1): ids, positions
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, seqs, ahead: int = 0) -> tuple[int, int]:
        """(rows, span) of a step over `seqs`, each `ahead` tokens longer than its host-side length."""
        rows = next(b for b in self.rows if b > max(s.slot for s in seqs))
        longest = max(s.length for s in seqs) + ahead
        span = MIN_SPAN
        while span < longest:
            span *= 2
        return rows, min(span, self.cache.max_seq)

    @torch.inference_mode()
    def __call__(self, seqs, chained: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (rows, V) and greedy tokens (rows,) of the bucket's rows (row i is slot i), for the
        next token of each sequence. Unchained, each sequence's last token is fed; chained, the tokens
        the previous step over the same sequences wrote into the inputs (not yet in `output`)."""
        rows, span = self.bucket(seqs, int(chained))
        if not chained:
            step = torch.zeros(2, rows, 1, dtype=torch.long)
            step[1] = self.cache.max_seq - 1  # rows with no sequence: token 0 at the unused last position
            slots = [s.slot for s in seqs]
            step[0, slots, 0] = torch.tensor([s.output[-1] for s in seqs])
            step[1, slots, 0] = torch.tensor([s.length - 1 for s in seqs])
            self._inputs(rows).copy_(step)  # one host-to-device copy
        if not self.capture:
            return self._forward(rows, span)
        graph, out = self.graphs.get((rows, span)) or self._capture(rows, span)
        graph.replay()
        return out

    def _inputs(self, rows: int) -> torch.Tensor:
        if rows not in self.inputs:
            self.inputs[rows] = torch.zeros(2, rows, 1, dtype=torch.long, device=self.device)
            self.inputs[rows][1] = self.cache.max_seq - 1
        return self.inputs[rows]

    def _forward(self, rows: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions = self.inputs[rows]
        return self.step(self.model, ids, positions, self.cache, span)

    def _capture(self, rows: int, span: int):
        """Warm up on a side stream (as torch.cuda.graphs asks), then record one step. The warm-up runs
        advance the inputs like a step does, so they are put back after each (recording runs nothing)."""
        inputs = self.inputs[rows]
        saved = inputs.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                inputs.copy_(saved)
                self._forward(rows, span)
            inputs.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(rows, span)
        self.graphs[rows, span] = graph, out
        return graph, out
