"""Text in, text out: a loaded model with its tokenizer, engine and detokenizers.

This is where ids meet text. `TextGenerator.load` resolves a model name or path, loads this rank's
weights and wraps them in the engine (`service.engine.core.Engine`); `generate` runs prompts (token ids)
through it, on its thread when it runs (the server, batch jobs), else on the calling thread, and returns
finished text, optionally streaming each final piece through `on_text`. A `Generation` is the text side of
one call: the consumer of its sequences' outputs on the engine's output stage (`service.engine.output`).
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
from service.engine.core import Engine
from service.engine.detok import Detokenizer
from service.engine.grammar import Grammars
from service.engine.metrics import Metrics
from service.engine.sampling_params import SamplingParams
from service.engine.sequence import Completion, SequenceOutput, TokenLogprob

OnText = Callable[[int, str], bool | None]  # (sequence index, a final piece of its text) -> True: it stops there


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None]
    end_token: int | None = None  # the end-of-turn or stop token that ended it: not in token_ids or text

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextGenerator:
    def __init__(self, name: str, directory: Path, engine: Engine, tokenizer: Tokenizer, load_s: float):
        self.name, self.directory, self.engine, self.tokenizer, self.load_s = name, directory, engine, tokenizer, load_s
        self.grammars = Grammars(tokenizer, engine.limits.vocab_size)  # structured outputs
        self.metrics: Metrics | None = None  # set by the HTTP app

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """log p(token i | tokens before it) for each token (None for the first), with `top` alternatives:
        a sequence that is prefilled and not decoded, batched with whatever else runs."""
        return self.generate([ids], [SamplingParams(max_tokens=0, prompt_logprobs=top)])[0].prompt_logprobs

    @classmethod
    def load(
        cls,
        name_or_path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: str = "none",
        chat_template: str | None = None,
        **engine_args,
    ) -> TextGenerator:
        """`chat_template`: Jinja text used instead of the model's; the rest go to the `Engine`."""
        start = time.perf_counter()
        directory = resolve(name_or_path)
        tokenizer = Tokenizer(directory)
        if chat_template is not None:
            tokenizer.use_template(chat_template)
        model = load_model(directory, dtype=dtype, device=device, quantization=quantization)
        if get_tp().size > 1:
            model = Leader(model)  # rank 0: announce each forward to the other ranks
        engine = Engine(model, tokenizer.stop_ids, device=device, **engine_args)
        return cls(name_or_path, directory, engine, tokenizer, time.perf_counter() - start)

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_text: OnText | None = None,
        priority: int = 0,
        on_end: Callable[[int], None] | None = None,
    ) -> list[TextResult]:
        """Generate for each prompt; `on_text(i, piece)` streams final text (returning True stops that
        sequence, finish reason "stop"); `on_end(i)` hears of sequence i's end; a higher `priority` number
        waits behind lower ones."""
        g = Generation(self, prompts, params, on_text, None, priority)
        if on_end is not None:
            for i, s in enumerate(g.seqs):
                s.on_finish = lambda _s, i=i: on_end(i)
        return g.results(self.engine.run(g.seqs))

    def complete(self, prompt: str | list[int], params: SamplingParams) -> TextResult:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return self.generate([ids], [params])[0]


class Generation:
    """One generate call's text side: the checked sequences for the engine, and for each a detokenizer, the
    tokens and log-probabilities its outputs brought (values: what a streamed piece copies), the pieces so
    far, and the request's metrics. `results` turns the engine's completions into text."""

    def __init__(
        self,
        gen: TextGenerator,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_text: OnText | None = None,
        request: str | None = None,
        priority: int = 0,
    ):
        self.gen, self.prompts, self.on_text = gen, prompts, on_text
        self.detoks = [Detokenizer(gen.tokenizer, p.stop) for p in params]
        self.pieces: list[list[str]] = [[] for _ in prompts]
        self.token_ids: list[list[int]] = [[] for _ in prompts]  # those the detokenizer has taken
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in prompts]
        self.prompt_logprobs: list[tuple[TokenLogprob | None, ...]] = [() for _ in prompts]
        self.start = time.perf_counter()
        self.last: dict[int, float] = {}  # when each sequence last produced a token
        self.on_prefill: Callable[[int, int], None] | None = None  # (i, prompt tokens in the cache so far)
        self.seqs = gen.engine.sequences(prompts, params, self.on_output, request, priority)
        for s in self.seqs:
            if s.params.grammar is not None:
                s.matcher = gen.grammars.matcher(s.params.grammar)

    def on_output(self, i: int, out: SequenceOutput) -> int | None:
        """On the output stage, sequence i's tokens of one step: None, or how many it took when one ended
        it (a stop string, or `on_text` said so)."""
        if out.prefilled is not None and self.on_prefill is not None:
            self.on_prefill(i, min(out.prefilled, len(self.prompts[i])))
        m = self.gen.metrics
        self.logprobs[i] += out.logprobs
        self.prompt_logprobs[i] = out.prompt_logprobs or self.prompt_logprobs[i]
        for k, token in enumerate(out.token_ids):
            if m:
                now = time.perf_counter()
                (m.inter_token if i in self.last else m.ttft).observe(now - self.last.get(i, self.start))
                self.last[i] = now
            self.token_ids[i].append(token)
            piece = self.detoks[i].push(token)
            if piece:
                self.pieces[i].append(piece)
                if self.on_text and self.on_text(i, piece):
                    return k + 1
            if self.detoks[i].stopped:
                return k + 1
        return None

    def results(self, done: list[Completion]) -> list[TextResult]:
        results = []
        for i, c in enumerate(done):
            tail = self.detoks[i].finish()
            if tail:
                self.pieces[i].append(tail)
                if self.on_text:
                    self.on_text(i, tail)
            text = "".join(self.pieces[i])
            results.append(
                TextResult(
                    text, c.token_ids, len(c.prompt_ids), c.finish_reason, c.logprobs, c.prompt_logprobs, c.end_token
                )
            )
        m = self.gen.metrics
        if m:
            for p, r in zip(self.prompts, results):
                m.finish(r.finish_reason, len(p), r.completion_tokens)
        return results
