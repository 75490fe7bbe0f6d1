"""The model runner: every model call of a step, and the pick of each sequence's next token.

`ModelRunner.execute(plan, cache)` runs a `service.engine.plan.StepPlan` over a paged KV cache: the
prefill of prompt chunks (with prompt log-probabilities where asked), one decode token per row, the
verification of prompt-lookup drafts, and greedy decode steps launched ahead of the host on the CUDA-graph
path (`launch`); each cache's `service.engine.sampler.Sampler` picks the tokens. It returns a
`StepOutput` and changes no sequence: the scheduler (`service.engine.scheduler`) records what it gives
back. It knows nothing about text, and nothing about which sequences run: the plan says.

It also makes the KV cache (`new_cache`, sized by `service.engine.memory`) and captures the decode steps ahead of the
first request (`warm_up`). Importable without the HTTP layer (no fastapi here).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from model.heap import keep_freed
from model.kv_cache import KVCache
from parallel.state import get_tp
from service.engine import memory
from service.engine.checks import Limits
from service.engine.cuda_graphs import MIN_SPAN, GraphDecoder
from service.engine.memory import BLOCK_SIZE
from service.engine.plan import Launched, Picked, StepOutput, StepPlan
from service.engine.sampler import Sampler, token_logprobs
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Sequence, TokenLogprob


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None on a CPU (a cache's pages are only taken as they are written)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        context: int | None = None,
        device: str | torch.device = "cpu",
        graphs: bool | None = None,
        compile: bool = False,
        kv_memory: int | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        cfg = model.config
        self.model = model
        self.limits = Limits(min(context or cfg.max_position, cfg.max_position), cfg.vocab_size)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed()  # each step's activations reuse the last one's pages
        self.dtype = next(model.parameters()).dtype
        self.kv_heads = max(1, cfg.num_kv_heads // get_tp().size)  # this rank's KV heads
        self.kv_memory, self.block_size = kv_memory, block_size  # the cache's bytes on this rank (None: default)
        self.width = -(-self.limits.context // block_size)  # blocks in a sequence's table, at most
        # Decode through a GraphDecoder: CUDA graphs, on by default on one CUDA device (the collectives of
        # tensor-parallel ranks are not captured). On a CPU the same static forward runs eagerly (tests).
        self.use_graphs = self.device.type == "cuda" and get_tp().size == 1 if graphs is None else graphs
        self.compile = compile  # torch.compile the step the graphs record
        self.graphs: GraphDecoder | None = None  # the decoder of the cache last decoded
        self.samplers: weakref.WeakKeyDictionary[KVCache, Sampler] = weakref.WeakKeyDictionary()  # per cache

    @property
    def context(self) -> int:
        return self.limits.context

    def token_bytes(self) -> int:
        cfg = self.model.config
        return KVCache.token_bytes(cfg.num_layers, self.kv_heads, cfg.head_dim, self.dtype)

    def layout(self, slots: int, length: int) -> tuple[int, int]:
        """(blocks, blocks per region) of the cache `new_cache` makes for `slots` sequences of `length`
        positions (`service.engine.memory.layout`, within --kv-cache-memory or the default share)."""
        import psutil

        free = free_memory(self.device)
        default = memory.default_kv_memory(free, psutil.virtual_memory().total, get_tp().size)
        per_sequence = -(-min(length, self.context) // self.block_size)
        return memory.layout(slots, per_sequence, self.token_bytes() * self.block_size, self.kv_memory, default)

    def new_cache(self, slots: int, length: int) -> KVCache:
        """A paged cache (`layout`); one that does not fit the device, or without a block for each of
        `slots` sequences, is refused with what to change (`CacheTooLarge`)."""
        cfg = self.model.config
        blocks, region = self.layout(slots, length)
        block_bytes = self.token_bytes() * self.block_size
        memory.check(blocks, slots, self.block_size, block_bytes, free_memory(self.device), str(self.device))
        return KVCache(
            cfg.num_layers, blocks, self.block_size, region, self.kv_heads, cfg.head_dim, self.dtype, self.device
        )

    def execute(self, plan: StepPlan, cache: KVCache) -> StepOutput:
        """Run `plan` over `cache`: a chained launch first (so the device works while the host reads the
        step before), then the collected tokens, the prefill chunks and their picks, and the decode,
        verification or launch of the decoding rows."""
        sampler = self.samplers.get(cache)
        if sampler is None:
            sampler = self.samplers[cache] = Sampler()
        launched = self.launch(plan.launch, cache, chained=True) if plan.chained else None
        picked: list[Picked] = []
        if plan.collect is not None:
            picked += [Picked(s, (t,)) for s, t in zip(plan.collect.seqs, plan.collect.result())]
        prompt_logprobs = []
        if plan.prefill:
            done, prompt_logprobs = self.prefill(plan.prefill, cache)
            ready = [(s, row) for s, row in done if s.params.max_tokens > 0]  # else the prompt only was scored
            if ready:
                picked += sampler.picked([s for s, _ in ready], torch.stack([row for _, row in ready]))
        if plan.launch and not plan.chained:
            launched = self.launch(plan.launch, cache)
        if plan.verify:
            for (s, d), logits in zip(plan.verify, self.verify(plan.verify, cache)):
                picked.append(sampler.verified(s, logits, d))
        if plan.decode:
            picked += sampler.picked(plan.decode, self.decode(plan.decode, cache))
        return StepOutput(tuple(prompt_logprobs), tuple(picked), launched)

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, int]], cache: KVCache) -> tuple[list, list]:
        """Feed the next `n` uncached tokens of each sequence (its prompt; after a preemption, its prompt and
        output so far), right-padded into one batch. Returns the last-token logits (V,) of the sequences
        this chunk puts wholly in the cache, as (sequence, logits), and the prompt log-probabilities of
        this chunk's tokens for each sequence that asks for them (`prompt_logprobs`), as (sequence, list),
        from the same forward (logits only at the positions that need them: one per row, plus the scored
        rows' positions). Each sequence holds the blocks of its chunk (the scheduler gave them)."""
        width = max(n for _, n in chunks)
        last = self.model.config.max_position - 1
        clash = [c for c in chunks if c[1] < width and c[0].prefilled + c[1] - 1 == last]
        if clash:  # a padded row ending at the last position: its padding could only be written over its last token
            rest = [c for c in chunks if c not in clash]
            parts = [self.prefill([c], cache) for c in clash] + ([self.prefill(rest, cache)] if rest else [])
            return [d for p in parts for d in p[0]], [lp for p in parts for lp in p[1]]
        at = [r * width + n - 1 for r, (_, n) in enumerate(chunks)]  # each row's last token, first
        scored = []  # (sequence, the prompt tokens its positions predict, where their logits start in `at`)
        for r, (s, n) in enumerate(chunks):
            if s.params.prompt_logprobs is not None and not s.output:
                following = s.prompt[s.prefilled + 1 : s.prefilled + n + 1]
                scored.append((s, following, len(at)))
                at += range(r * width, r * width + len(following))
        feed = [(s, s.tokens()[s.prefilled : s.prefilled + n], s.prefilled) for s, n in chunks]
        logits = self._forward(feed, cache, at)
        prompt_logprobs = []
        for s, following, start in scored:
            got: list[TokenLogprob | None] = [None] if s.prefilled == 0 else []  # the first token has no context
            if following:
                rows = logits[start : start + len(following)]
                got += token_logprobs(rows, following, s.params.prompt_logprobs)
            prompt_logprobs.append((s, tuple(got)))
        done = [(s, row) for (s, n), row in zip(chunks, logits) if s.prefilled + n == s.length]
        return done, prompt_logprobs

    def _forward(self, feed: list[tuple[Sequence, list[int], int]], cache: KVCache, at: list[int]) -> torch.Tensor:
        """One forward over rows of (sequence, tokens, position of the first), right-padded; the logits at
        `at` (positions in the flattened batch). Padding takes positions past the row's blocks, so that its
        writes land in the null block (`prefill` keeps a row ending at the last position unpadded)."""
        width, last = max(len(t) for _, t, _ in feed), self.model.config.max_position - 1
        ids = torch.zeros(len(feed), width, dtype=torch.long)
        positions = torch.zeros(len(feed), width, dtype=torch.long)
        for r, (s, tokens, start) in enumerate(feed):
            n = len(tokens)
            ids[r, :n] = torch.tensor(tokens)
            positions[r, :n] = start + torch.arange(n)
            positions[r, n:] = (len(s.blocks) * self.block_size + torch.arange(width - n)).clamp(max=last)
        d = self.device
        blocks = self.tables([s for s, _, _ in feed], int(positions.max()) // self.block_size + 1)
        return self.model(ids.to(d), positions.to(d), cache, blocks.to(d), logits_index=torch.tensor(at, device=d))

    @torch.inference_mode()
    def verify(self, rows: list[tuple[Sequence, list[int]]], cache: KVCache) -> list[torch.Tensor]:
        """Feed each decoding sequence its last token and then its draft (`service.engine.lookup`) in one
        forward; returns each row's logits (1 + len(draft), V): what the model predicts after each fed token.
        Each sequence holds the blocks of its draft's positions (the scheduler gave them), which must leave
        the padding off the last position (`Scheduler._drafts` keeps drafts well inside the context)."""
        width = 1 + max(len(d) for _, d in rows)
        at = [r * width + j for r, (_, d) in enumerate(rows) for j in range(1 + len(d))]
        logits = self._forward([(s, [s.output[-1], *d], s.length - 1) for s, d in rows], cache, at)
        return list(logits.split([1 + len(d) for _, d in rows]))

    @staticmethod
    def tables(seqs: list[Sequence], width: int) -> torch.Tensor:
        """(len(seqs), width) the sequences' block tables, cut or padded with the null block to `width`."""
        return torch.tensor([(s.blocks + [0] * width)[:width] for s in seqs], dtype=torch.long)

    def _decoder(self, cache: KVCache) -> GraphDecoder:
        if self.graphs is None or self.graphs.cache is not cache:
            self.graphs = GraphDecoder(self.model, cache, self.width, self.device.type == "cuda", self.compile)
        return self.graphs

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], cache: KVCache) -> torch.Tensor:
        """One token for every sequence: returns logits (B, V)."""
        if self.use_graphs:
            logits, _ = self._decoder(cache)(seqs)
            slots = [s.slot for s in seqs]
            if slots == list(range(len(seqs))):
                return logits[: len(seqs)]
            return logits[torch.tensor(slots, device=self.device)]
        d = self.device
        ids = torch.tensor([[s.output[-1]] for s in seqs], device=d)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=d)
        blocks = self.tables(seqs, (max(s.length for s in seqs) - 1) // self.block_size + 1).to(d)
        return self.model(ids, positions, cache, blocks, logits_index=torch.arange(len(seqs), device=d))

    def warm_up(self, cache: KVCache, slots: int) -> list[tuple[int, int]]:
        """Capture the decode step of every row bucket up to `slots` rows at the two shortest spans and a
        whole table, so that no request waits for that; the server turns ready after this. With `compile`
        these are also all the shapes the compiler specializes on (rows 1 or more; a span of 256, any
        span, a whole table), so no request waits for a compile either. Writes only the null block.
        Returns the (rows, span) buckets warmed up: none off the graph path."""
        if not self.use_graphs:
            return []
        decoder = self._decoder(cache)
        buckets = []
        whole = decoder.width * self.block_size
        for span in sorted({min(MIN_SPAN, whole), min(2 * MIN_SPAN, whole), whole}):
            for rows in decoder.buckets(slots):
                s = Sequence([0] * (span - 1), SamplingParams(), slot=rows - 1, output=[0])  # position span - 1
                buckets.append(decoder.bucket([s]))
                decoder([s])
        return buckets

    def launch(self, seqs: list[Sequence], cache: KVCache, chained: bool = False) -> Launched:
        """Start a greedy decode step over `seqs` and return without waiting for it. Chained, it decodes
        the tokens of the step launched just before over the same sequences, which the host has not
        read yet: the GPU runs this step while the host takes the previous one's tokens."""
        with torch.inference_mode():
            _, tokens = self._decoder(cache)(seqs, chained)
        if not tokens.is_cuda:
            return Launched(seqs, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)  # ordered before the next replay overwrites `tokens`
        ready = torch.cuda.Event()
        ready.record()
        return Launched(seqs, host, ready)

    @torch.inference_mode()
    def tiny_forward(self) -> None:
        """A one-token forward through every rank (readiness), on the thread that owns the model: raises
        if the engine cannot run."""
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model(one, one)
