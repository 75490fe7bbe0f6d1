"""Generation engine: prefill and decode over a batch of token-id sequences with a KV cache.

It knows nothing about text: prompts are token ids and so are the results. The text side (stop
strings, streaming detokenization) decides per token whether a sequence is done through the
`on_token` callback. Prompts are prefilled together, right-padded, in chunks of at most
`prefill_chunk` tokens; then every unfinished sequence advances one token per decode step, and a
finished one drops out of the batch at once.

Importable without the HTTP layer (no fastapi here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from model.kv_cache import KVCache
from parallel.state import get_tp
from service.sampling import SamplingParams, repeated_ngram_tokens, sample

OnToken = Callable[[int, int], bool]  # (sequence index, token id) -> True to stop that sequence


class ContextOverflow(ValueError):
    """A prompt plus its token budget does not fit the model's context."""


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    slot: int
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end token, stop string) or "length"
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when params.logprobs is set

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class TokenLogprob:
    """log p of the chosen token under the model (before any sampling processor), and the most likely
    alternatives as (token id, log p)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        stop_ids: frozenset[int] = frozenset(),
        max_batch: int = 8,
        context: int | None = None,
        prefill_chunk: int = 512,
        device: str | torch.device = "cpu",
    ):
        cfg = model.config
        self.model, self.stop_ids, self.max_batch = model, stop_ids, max_batch
        self.context = min(context or cfg.max_position, cfg.max_position)
        self.prefill_chunk, self.device = prefill_chunk, torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.kv_heads = max(1, cfg.num_kv_heads // get_tp().size)  # this rank's KV heads
        self.cache: KVCache | None = None

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise ValueError("prompt is empty")
        if prompt_len + max_tokens > self.context:
            raise ContextOverflow(
                f"prompt has {prompt_len} tokens and max_tokens is {max_tokens}: "
                f"{prompt_len + max_tokens} > the context of {self.context} tokens"
            )

    def _cache_for(self, slots: int, length: int) -> KVCache:
        """Reuse the cache when it is big enough; else allocate one rounded up to 256 positions."""
        c = self.cache
        if c is None or c.num_slots < slots or c.max_seq < length:
            cfg = self.model.config
            length = min(self.context, -(-length // 256) * 256)
            c = self.cache = KVCache(
                cfg.num_layers,
                max(slots, c.num_slots if c else 0),
                length,
                self.kv_heads,
                cfg.head_dim,
                self.dtype,
                self.device,
            )
        return c

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], on_token: OnToken | None = None
    ) -> list[Completion]:
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed the batch limit of {self.max_batch}")
        for p, sp in zip(prompts, params):
            self.check_fits(len(p), sp.max_tokens)
        seqs = [
            Sequence(
                list(p), sp, slot=i, generator=torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
            )
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        cache = self._cache_for(len(seqs), max(s.length + s.params.max_tokens for s in seqs))
        logits = self.prefill(seqs, cache)
        running = seqs
        while running:
            tokens = self._pick(running, logits)
            running = [s for s, t in zip(running, tokens) if not self._append(s, t, on_token)]
            if running:
                logits = self.decode(running, cache)
        return [Completion(s.prompt, s.output, s.finish_reason, s.logprobs) for s in seqs]

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        if all(s.params.greedy for s in seqs):
            out = logits.argmax(-1).tolist()
        else:
            out = []
            for s, row in zip(seqs, logits):
                seen = torch.tensor(s.prompt + s.output, device=row.device)
                banned = repeated_ngram_tokens(s.output, s.params.no_repeat_ngram)
                out.append(sample(row, s.params, seen, s.generator, banned))
        for s, row, token in zip(seqs, logits, out):
            if s.params.logprobs is not None:
                s.logprobs.append(token_logprob(row, token, s.params.logprobs))
        return out

    def _append(self, s: Sequence, token: int, on_token: OnToken | None) -> bool:
        """Record a token; True when the sequence is finished."""
        if token in s.params.stop_token_ids or (token in self.stop_ids and not s.params.ignore_eos):
            s.finish_reason = "stop"  # the end token itself is not part of the output
            return True
        s.output.append(token)
        if on_token is not None and on_token(s.slot, token):  # slot == index in `prompts`
            s.finish_reason = "stop"
        elif len(s.output) >= s.params.max_tokens:
            s.finish_reason = "length"
        return s.finish_reason is not None

    def prefill(self, seqs: list[Sequence], cache: KVCache) -> torch.Tensor:
        """Run the prompts through the model in chunks; returns the last prompt token's logits (B, V)."""
        last = [None] * len(seqs)
        longest = max(len(s.prompt) for s in seqs)
        for start in range(0, longest, self.prefill_chunk):
            rows = [i for i, s in enumerate(seqs) if len(s.prompt) > start]
            parts = [seqs[i].prompt[start : start + self.prefill_chunk] for i in rows]
            width = max(len(p) for p in parts)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, p in enumerate(parts):
                ids[r, : len(p)] = torch.tensor(p)
            positions = (start + torch.arange(width)).clamp(max=cache.max_seq - 1).expand(len(rows), width)
            lengths = torch.tensor([len(p) for p in parts])
            slots = torch.tensor([seqs[i].slot for i in rows])
            logits = self.model(
                ids.to(self.device),
                positions.to(self.device),
                cache,
                slots.to(self.device),
                logits_index=(lengths - 1).to(self.device),
            )
            for r, i in enumerate(rows):
                if start + len(parts[r]) == len(seqs[i].prompt):
                    last[i] = logits[r]
        return torch.stack(last)

    def decode(self, seqs: list[Sequence], cache: KVCache) -> torch.Tensor:
        """One token for every sequence: returns logits (B, V)."""
        ids = torch.tensor([[s.output[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        return self.model(
            ids, positions, cache, slots, logits_index=torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        )

    @torch.inference_mode()
    def probe(self) -> None:
        """A one-token forward through every rank: raises if the engine cannot run."""
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model(one, one)

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """log p(token i | tokens before it) for each token (None for the first), with `top` alternatives."""
        self.check_fits(len(ids), 0)
        cache = self._cache_for(1, len(ids))
        out: list[TokenLogprob | None] = [None]
        slots = torch.zeros(1, dtype=torch.long, device=self.device)
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[start : start + self.prefill_chunk]], device=self.device)
            positions = start + torch.arange(chunk.shape[1], device=self.device)[None]
            logits = self.model(chunk, positions, cache, slots)[0]  # (T, V)
            nxt = ids[start + 1 : start + 1 + chunk.shape[1]]
            out += [token_logprob(row, token, top) for row, token in zip(logits, nxt)]
        return out


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under one row of logits (V,), and the `top` best."""
    logp = logits.float().log_softmax(-1)
    best = torch.topk(logp, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(float(logp[token]), pairs)
