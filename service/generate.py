"""Text in, text out: a loaded model with its tokenizer, engine and detokenizers.

This is where ids meet text. `TextGenerator.load` resolves a model name or path, loads this rank's
weights and wraps them in the engine; `generate` runs prompts (token ids) and returns finished text,
optionally streaming each final piece through `on_text`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.loader import load_model
from model.ranks import Leader
from model.registry import resolve
from model.tokenizer import Tokenizer
from parallel.state import get_tp
from service.detok import Detokenizer
from service.engine import Engine
from service.metrics import Metrics
from service.sampling import SamplingParams
from service.sequence import TokenLogprob


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob]

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextGenerator:
    def __init__(self, name: str, directory: Path, engine: Engine, tokenizer: Tokenizer, load_s: float):
        self.name, self.directory, self.engine, self.tokenizer, self.load_s = name, directory, engine, tokenizer, load_s
        self.metrics: Metrics | None = None  # set by the HTTP app

    @classmethod
    def load(
        cls, name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **engine_args
    ) -> TextGenerator:
        start = time.perf_counter()
        directory = resolve(name_or_path)
        tokenizer = Tokenizer(directory)
        model = load_model(directory, dtype=dtype, device=device)
        if get_tp().size > 1:
            model = Leader(model)  # rank 0: announce each forward to the other ranks
        engine = Engine(model, tokenizer.stop_ids, device=device, **engine_args)
        return cls(name_or_path, directory, engine, tokenizer, time.perf_counter() - start)

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        priority: int = 0,
    ) -> list[TextResult]:
        """Generate for each prompt; `on_text(i, piece)` streams final text (returning True stops that
        sequence, finish reason "stop"), `cancelled()` turning true stops every sequence at its next
        token; a higher `priority` number waits behind lower ones."""
        detoks = [Detokenizer(self.tokenizer, p.stop) for p in params]
        pieces: list[list[str]] = [[] for _ in prompts]
        start = time.perf_counter()
        last: dict[int, float] = {}  # when each sequence last produced a token

        def on_token(i: int, token: int) -> bool:
            if self.metrics:
                now = time.perf_counter()
                (self.metrics.inter_token if i in last else self.metrics.ttft).observe(now - last.get(i, start))
                last[i] = now
            piece = detoks[i].push(token)
            if piece:
                pieces[i].append(piece)
                if on_text and on_text(i, piece):
                    return True
            return detoks[i].stopped

        done = self.engine.generate(prompts, params, on_token, cancelled, priority)
        results = []
        for i, c in enumerate(done):
            tail = detoks[i].finish()
            if tail:
                pieces[i].append(tail)
                if on_text:
                    on_text(i, tail)
            results.append(TextResult("".join(pieces[i]), c.token_ids, len(c.prompt_ids), c.finish_reason, c.logprobs))
        if self.metrics:
            m = self.metrics
            m.latency.observe(time.perf_counter() - start)
            m.batch_size.observe(len(prompts))
            m.prompt_tokens.inc(sum(map(len, prompts)))
            for r in results:
                m.generation_tokens.inc(r.completion_tokens)
                m.finished.labels(r.finish_reason).inc()
        return results

    def complete(self, prompt: str | list[int], params: SamplingParams) -> TextResult:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return self.generate([ids], [params])[0]
