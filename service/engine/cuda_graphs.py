"""Decode steps replayed from CUDA graphs.

A decode step of a small model is hundreds of tiny kernels: launched one by one from Python, the
launches, not the GPU, set the pace. A `GraphDecoder` captures the whole forward of one decode step
once per (rows, span) bucket and replays it, so a step costs one launch.

A captured graph reads fixed addresses and fixed shapes. So the inputs (token ids, positions and
block tables) live in static buffers, the rows of bucket B are the scheduler's slots 0..B-1 (it hands
out the lowest free slot among equals, so the running sequences mostly sit in the low slots), and attention reads
keys [0, span) of each row's table under a mask (`Batch.fixed`) instead of reading the longest
position back to the host. A row with no sequence has a table of null blocks: it decodes token 0
into the null block, which no sequence attends to, so it changes nothing.

Each step also takes every row's greedy token and writes it, with the next position, into the input
buffers. A step can then be *chained*: launched without token ids or positions from the host, while
the host is still reading the previous step's tokens (`ModelRunner.launch`), so the host's work per token
overlaps the GPU's instead of adding to it. The tables are copied in at every launch, chained or not:
the scheduler gives each sequence the block of the position a chained step writes before launching it.

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

MIN_SPAN = 256
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


def decode_step(model: nn.Module, inputs: torch.Tensor, tables: torch.Tensor, cache: KVCache, span: int):
    """One static decode step over rows 0..B-1: logits (B, V) and greedy tokens (B,). `inputs` (2, B, 1):
    token ids and positions, which become each row's greedy token at the next position (the last
    position of a table stays put); `tables` (B, width): block tables, read for the first `span` positions."""
    ids, positions = inputs
    rows = torch.arange(ids.shape[0], device=ids.device)  # each row's one position
    blocks = tables[:, : span // cache.block_size]
    logits = model(ids, positions, cache, blocks, logits_index=rows, fixed=True)
    tokens = logits.argmax(-1)
    ids.copy_(tokens[:, None])
    positions.copy_((positions + 1).clamp(max=min(tables.shape[1] * cache.block_size, model.config.max_position) - 1))
    return logits, tokens


def compile_step():
    """`decode_step` through `torch.compile`. A fullgraph compile fails hard past dynamo's recompile limit
    (8 per function): one cache takes up to 6 (rows 1 or more x a span of 256, any span, a whole table), and
    each new cache or model adds more, so the limit is raised while it runs."""
    step = torch.compile(decode_step, fullgraph=True, options=COMPILE_OPTIONS)

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=64):
            return step(*args)

    return run


class GraphDecoder:
    def __init__(self, model: nn.Module, cache: KVCache, width: int, capture: bool = True, compile: bool = False):
        """`width`: blocks in a table (a sequence's whole context)."""
        self.model, self.cache, self.width, self.capture = model, cache, width, capture
        self.step = compile_step() if compile else decode_step
        self.device = cache.k.device
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows -> (2, B, 1) ids and positions,
        # (B, width) tables
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    @staticmethod
    def buckets(slots: int) -> list[int]:
        """The row buckets of steps over `slots` slots: powers of two."""
        return [1 << i for i in range((slots - 1).bit_length() + 1)]

    def bucket(self, seqs, ahead: int = 0) -> tuple[int, int]:
        """(rows, span) of a step over `seqs`, each `ahead` tokens longer than its host-side length."""
        rows = 1 << max(s.slot for s in seqs).bit_length()
        longest = max(s.length for s in seqs) + ahead
        span = MIN_SPAN
        while span < longest:
            span *= 2
        return rows, min(span, self.width * self.cache.block_size)

    @torch.inference_mode()
    def __call__(self, seqs, chained: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (rows, V) and greedy tokens (rows,) of the bucket's rows (row i is slot i), for the
        next token of each sequence. Unchained, each sequence's last token is fed; chained, the tokens
        the previous step over the same sequences wrote into the inputs (not yet in `output`)."""
        rows, span = self.bucket(seqs, int(chained))
        inputs, tables = self._inputs(rows)
        table = torch.zeros(rows, self.width, dtype=torch.long)
        slots = [s.slot for s in seqs]
        for s in seqs:
            table[s.slot, : len(s.blocks)] = torch.tensor(s.blocks)
        if not chained:
            step = torch.zeros(2, rows, 1, dtype=torch.long)
            step[0, slots, 0] = torch.tensor([s.output[-1] for s in seqs])
            step[1, slots, 0] = torch.tensor([s.length - 1 for s in seqs])
            inputs.copy_(step)
        self.cache.zero(table)  # a CPU pool's blocks, before their first use (outside what is compiled)
        tables.copy_(table)
        if not self.capture:
            return self.step(self.model, inputs, tables, self.cache, span)
        graph, out = self.graphs.get((rows, span)) or self._capture(rows, span)
        graph.replay()
        return out

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows not in self.inputs:
            self.inputs[rows] = (
                torch.zeros(2, rows, 1, dtype=torch.long, device=self.device),
                torch.zeros(rows, self.width, dtype=torch.long, device=self.device),
            )
        return self.inputs[rows]

    def _capture(self, rows: int, span: int):
        """Warm up on a side stream (as torch.cuda.graphs asks), then record one step. The warm-up runs
        advance the inputs like a step does, so they are put back after each (recording runs nothing)."""
        inputs, tables = self.inputs[rows]
        saved = inputs.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                inputs.copy_(saved)
                self.step(self.model, inputs, tables, self.cache, span)
            inputs.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(self.model, inputs, tables, self.cache, span)
        self.graphs[rows, span] = graph, out
        return graph, out
