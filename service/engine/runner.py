"""Generation engine: prefill and decode of token-id sequences over a paged KV cache.

It knows nothing about text: prompts are token ids and so are the results. The text side (stop
strings, streaming detokenization) decides per token whether a sequence is done through each
sequence's `on_token` callback.

The work is done in steps by a `service.engine.batcher.Batcher` (continuous batching). `Engine.run`
drives a batcher of its own on the calling thread; the server's `service.engine.scheduler.Scheduler`
drives one on its engine thread, which then makes every model call. Token ids the model cannot embed are refused
with `InvalidRequest` (`check_tokens`) before they reach a forward. The engine holds the model calls
a step makes: prefill, decode, the verification of prompt-lookup drafts (`verify`) and greedy steps
launched ahead of the host (`launch`); each batcher's `service.engine.sampler.Sampler` chooses the tokens.

Importable without the HTTP layer (no fastapi here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.kv_cache import KVCache
from parallel.state import get_tp
from service.engine.batcher import Batcher, Launched
from service.engine.cuda_graphs import MIN_SPAN, GraphDecoder
from service.engine.memory import BLOCK_SIZE, CPU_SHARE, GPU_SHARE
from service.engine.sampler import token_logprobs
from service.engine.sampling import SamplingParams
from service.engine.sequence import Completion, Sequence
from service.errors import ContextOverflow, InvalidRequest

PROMPT_LOOKUP = 5  # draft tokens: on SQuAD dev answers (SmolLM2, 2-core CPU) 3 gave 1.57x, 5 1.74x, 8 1.72x
LOOKUP_ROWS = 8  # 5 draft tokens for 1, 2, 4 and 8 rows of SQuAD answers: 1.70x, 1.56x, 1.57x, 1.52x

OnToken = Callable[[int, int], bool]  # (sequence index, token id) -> True to stop that sequence


class CacheTooLarge(ValueError):
    """A KV cache bigger than the device's free memory, or too small for one block per sequence."""


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None on a CPU (a cache's pages are only taken as they are written)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def default_kv_memory(device: torch.device) -> int:
    """The KV cache's bytes on this rank when --kv-cache-memory is not given."""
    free = free_memory(device)
    if free is not None:
        return int(free * GPU_SHARE)
    import psutil

    return int(psutil.virtual_memory().total * CPU_SHARE / get_tp().size)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        stop_ids: frozenset[int] = frozenset(),
        max_batch: int = 8,
        context: int | None = None,
        prefill_chunk: int = 512,
        device: str | torch.device = "cpu",
        graphs: bool | None = None,
        compile: bool = False,
        overlap: bool = True,
        kv_memory: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
        prompt_lookup: int | None = None,
        lookup_rows: int = LOOKUP_ROWS,
    ):
        cfg = model.config
        self.model, self.stop_ids, self.max_batch = model, stop_ids, max_batch
        self.context = min(context or cfg.max_position, cfg.max_position)
        self.prefill_chunk, self.device = prefill_chunk, torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = cfg.vocab_size
        self.kv_heads = max(1, cfg.num_kv_heads // get_tp().size)  # this rank's KV heads
        self.kv_memory, self.block_size = kv_memory, block_size  # the cache's bytes on this rank (None: default)
        self.prefix_caching = prefix_caching  # reuse cached blocks of earlier prompts (`Batcher`)
        self.lookup_rows = lookup_rows  # decoding rows a step may verify drafts for, at most
        self.width = -(-self.context // block_size)  # blocks in a sequence's table, at most
        self.batcher: Batcher | None = None  # the calling thread's (`run` without a scheduler), cache and all
        # Decode through a GraphDecoder: CUDA graphs, on by default on one CUDA device (the collectives of
        # tensor-parallel ranks are not captured). On a CPU the same static forward runs eagerly (tests).
        self.use_graphs = self.device.type == "cuda" and get_tp().size == 1 if graphs is None else graphs
        self.compile = compile  # torch.compile the step the graphs record
        self.overlap = overlap  # greedy graph steps are launched ahead of the host (see `launch`)
        self.graphs: GraphDecoder | None = None  # the decoder of the cache last decoded
        # draft tokens verified per step (`Batcher._drafts`; 0: off); by default off on the graph path,
        # where verification would run eagerly beside captured decode steps (not measured)
        self.prompt_lookup = (0 if self.use_graphs else PROMPT_LOOKUP) if prompt_lookup is None else prompt_lookup

    def check_tokens(self, ids: list[int], param: str = "prompt") -> None:
        """Refuse token ids the model has no embedding for (they would fail its forward)."""
        vocab = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad} is outside the vocabulary of {vocab} tokens (ids 0 to {vocab - 1})", param=param
            )

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequest("prompt is empty", param="prompt")
        if prompt_len + max_tokens > self.context:
            raise ContextOverflow.too_long(self.context, prompt_len, max_tokens)

    def token_bytes(self) -> int:
        cfg = self.model.config
        return KVCache.token_bytes(cfg.num_layers, self.kv_heads, cfg.head_dim, self.dtype)

    def layout(self, slots: int, length: int) -> tuple[int, int]:
        """(blocks, blocks per region) of the cache `new_cache` makes: as many blocks as --kv-cache-memory
        holds; by default, within `default_kv_memory`, a home region of `length` positions for each of
        `slots` sequences and one more region (the null block's). A region holds `length` positions at most."""
        block = self.token_bytes() * self.block_size
        per_sequence = -(-min(length, self.context) // self.block_size)
        if self.kv_memory is not None:
            blocks = self.kv_memory // block
        else:
            blocks = min((slots + 1) * per_sequence, default_kv_memory(self.device) // block)
        region = max(1, min(per_sequence, blocks // (slots + 1)))
        return blocks // region * region, region

    def new_cache(self, slots: int, length: int) -> KVCache:
        """A paged cache (`layout`). On a GPU, one that does not fit the free memory is refused with what
        to change; so is one without a block for each of `slots` sequences."""
        cfg = self.model.config
        blocks, region = self.layout(slots, length)
        need, free = blocks * self.block_size * self.token_bytes(), free_memory(self.device)
        if free is not None and need > free:
            raise CacheTooLarge(
                f"the KV cache of {blocks} blocks needs {need / 2**30:.2f} GiB and {self.device} has "
                f"{free / 2**30:.2f} GiB free: lower --kv-cache-memory"
            )
        if blocks < slots + 1:
            raise CacheTooLarge(
                f"--kv-cache-memory holds {max(blocks - 1, 0)} blocks of {self.block_size} tokens "
                f"({self.token_bytes() * self.block_size} bytes each) and {slots} sequences need one each: raise it"
            )
        return KVCache(
            cfg.num_layers, blocks, self.block_size, region, self.kv_heads, cfg.head_dim, self.dtype, self.device
        )

    def _batcher_for(self, slots: int, length: int) -> Batcher:
        """The calling thread's batcher, reused (prefix cache and all) while its cache is big enough."""
        b = self.batcher
        blocks, region = self.layout(slots, length)
        if b is None or b.slots < slots or b.cache.num_blocks < blocks or b.cache.region < region:
            slots = max(slots, b.slots if b else 0)
            self.batcher = b = Batcher(self, self.new_cache(slots, length), slots)
        return b

    def sequences(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_token: OnToken | None = None,
        request: str | None = None,
        priority: int = 0,
    ) -> list[Sequence]:
        """Checked sequences for `run` (or the scheduler): raises `InvalidRequest` for a prompt the model
        cannot take."""
        for p, sp in zip(prompts, params):
            self.check_prompt(p, sp.max_tokens)
            self.check_tokens([t for t, _ in sp.logit_bias], param="logit_bias")
        return [
            Sequence(list(p), sp, (lambda t, i=i: on_token(i, t)) if on_token else None, request, priority)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]

    def run(self, seqs: list[Sequence]) -> list[Completion]:
        """Run sequences to the end on a batcher of this thread's own (a `Scheduler` has the same `run`
        for its engine thread)."""
        batcher = self._batcher_for(min(len(seqs), self.max_batch), max(s.length + s.params.max_tokens for s in seqs))
        for s in seqs:
            batcher.add(s)
        while batcher.busy():
            batcher.step()
        for s in seqs:
            if s.error is not None:
                raise s.error
        return [s.completion() for s in seqs]

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_token: OnToken | None = None,
        priority: int = 0,
    ) -> list[Completion]:
        return self.run(self.sequences(prompts, params, on_token, None, priority))

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, int]], cache: KVCache) -> list[tuple[Sequence, torch.Tensor]]:
        """Feed the next `n` uncached tokens of each sequence (its prompt; after a preemption, its prompt and
        output so far), right-padded into one batch; returns the last-token logits (V,) of the sequences
        now wholly in the cache. A sequence that asks for `prompt_logprobs` gets those of this chunk's
        tokens from the same forward (logits only at the positions that need them: one per row, plus the
        scored rows' positions). Each sequence holds the blocks of its chunk (`Batcher`)."""
        width = max(n for _, n in chunks)
        last = self.model.config.max_position - 1
        clash = [c for c in chunks if c[1] < width and c[0].prefilled + c[1] - 1 == last]
        if clash:  # a padded row ending at the last position: its padding could only be written over its last token
            rest = [c for c in chunks if c not in clash]
            return sum((self.prefill([c], cache) for c in clash), self.prefill(rest, cache) if rest else [])
        at = [r * width + n - 1 for r, (_, n) in enumerate(chunks)]  # each row's last token, first
        scored = []  # (sequence, the prompt tokens its positions predict, where their logits start in `at`)
        for r, (s, n) in enumerate(chunks):
            if s.params.prompt_logprobs is not None and not s.output:
                following = s.prompt[s.prefilled + 1 : s.prefilled + n + 1]
                scored.append((s, following, len(at)))
                at += range(r * width, r * width + len(following))
        feed = [(s, s.tokens()[s.prefilled : s.prefilled + n], s.prefilled) for s, n in chunks]
        logits = self._forward(feed, cache, at)
        for s, following, start in scored:
            if s.prefilled == 0:
                s.prompt_logprobs.append(None)  # the first token has no context
            if following:
                rows = logits[start : start + len(following)]
                s.prompt_logprobs += token_logprobs(rows, following, s.params.prompt_logprobs)
        done = []
        for (s, n), row in zip(chunks, logits):
            s.prefilled += n
            if s.prefilled == s.length:
                done.append((s, row))
        return done

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
        Each sequence holds the blocks of its draft's positions (`Batcher`), which must leave the padding
        off the last position (`Batcher._drafts` keeps drafts well inside the context)."""
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

    def chains(self, seqs: list[Sequence]) -> bool:
        """Whether decode steps over `seqs` may be launched ahead of the host: on the graph path, when
        every sequence takes the plain greedy token and wants no log-probabilities."""
        return self.use_graphs and self.overlap and all(s.params.greedy and s.params.logprobs is None for s in seqs)

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

    def append(self, s: Sequence, token: int) -> bool:
        """Record a token; True when the sequence is finished."""
        if token in s.params.stop_token_ids or (token in self.stop_ids and not s.params.ignore_eos):
            s.finish_reason, s.end_token = "stop", token  # not part of the output (its logprob stays last)
            return True
        s.output.append(token)
        if s.on_token is not None and s.on_token(token):
            s.finish_reason = "stop"
        elif len(s.output) >= s.params.max_tokens:
            s.finish_reason = "length"
        return s.finish_reason is not None

    @torch.inference_mode()
    def tiny_forward(self) -> None:
        """A one-token forward through every rank (readiness), on the thread that owns the model: raises
        if the engine cannot run."""
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model(one, one)

    def check_prompt(self, ids: list[int], max_tokens: int = 0) -> None:
        self.check_tokens(ids)
        self.check_fits(len(ids), max_tokens)
