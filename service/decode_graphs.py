"""Decode steps replayed from CUDA graphs.

A decode step of a small model is hundreds of tiny kernels: launched one by one from Python, the
launches, not the GPU, set the pace. A `GraphDecoder` captures the whole forward of one decode step
once per (rows, span) bucket and replays it, so a step costs one launch.

A captured graph reads fixed addresses and fixed shapes. So the inputs live in static buffers, the
rows of bucket B are the cache slots 0..B-1 (the batcher hands out the lowest free slot first, so
the running sequences sit in the low slots), and attention reads keys [0, span) under a mask
(`Batch.fixed`) instead of reading the longest position back to the host. A row with no sequence
decodes token 0 at the cache's last position, which no sequence ever uses (a prompt plus its token
budget must fit the cache, and the last sampled token is never fed back), so it changes nothing.

With `capture=False` the same static forward runs eagerly: that is how the CPU tests check it.
With `compile=True` the recorded forward is first compiled by `torch.compile` (Inductor fuses the
element-wise kernels between the matrix products: fewer, larger launches per step).
"""

from __future__ import annotations

import torch
from torch import nn

from model.kv_cache import KVCache

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
MIN_SPAN = 256


class GraphDecoder:
    def __init__(self, model: nn.Module, cache: KVCache, capture: bool = True, compile: bool = False):
        self.model, self.cache, self.capture = model, cache, capture
        self.forward = torch.compile(model, fullgraph=True) if compile else model
        self.rows = sorted({b for b in ROWS if b < cache.num_slots} | {cache.num_slots})
        self.device = cache.k[0].device
        self.inputs: dict[int, torch.Tensor] = {}  # rows -> (2, B, 1): ids, positions
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, seqs) -> tuple[int, int]:
        rows = next(b for b in self.rows if b > max(s.slot for s in seqs))
        longest = max(s.length for s in seqs)
        span = MIN_SPAN
        while span < longest:
            span *= 2
        return rows, min(span, self.cache.max_seq)

    @torch.inference_mode()
    def __call__(self, seqs) -> torch.Tensor:
        """Logits (len(seqs), V) of the next token of each sequence (its last token is fed)."""
        rows, span = self.bucket(seqs)
        step = torch.zeros(2, rows, 1, dtype=torch.long)
        step[1] = self.cache.max_seq - 1  # rows with no sequence: token 0 at the unused last position
        slots = [s.slot for s in seqs]
        step[0, slots, 0] = torch.tensor([s.output[-1] for s in seqs])
        step[1, slots, 0] = torch.tensor([s.length - 1 for s in seqs])
        self._inputs(rows).copy_(step)  # one host-to-device copy
        if not self.capture:
            logits = self._forward(rows, span)
        else:
            graph, logits = self.graphs.get((rows, span)) or self._capture(rows, span)
            graph.replay()
        if slots == list(range(len(seqs))):
            return logits[: len(seqs)]
        return logits[torch.tensor(slots, device=self.device)]

    def _inputs(self, rows: int) -> torch.Tensor:
        if rows not in self.inputs:
            self.inputs[rows] = torch.zeros(2, rows, 1, dtype=torch.long, device=self.device)
            self.inputs[rows][1] = self.cache.max_seq - 1
        return self.inputs[rows]

    def _forward(self, rows: int, span: int) -> torch.Tensor:
        ids, positions = self.inputs[rows]
        last = torch.zeros(rows, dtype=torch.long, device=self.device)
        return self.forward(ids, positions, self.cache, None, logits_index=last, span=span)

    def _capture(self, rows: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (as torch.cuda.graphs asks), then record one step. The inputs already
        hold this step's values, and the warm-up runs write only what the replay writes again."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(rows, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(rows, span)
        self.graphs[rows, span] = graph, logits
        return graph, logits
