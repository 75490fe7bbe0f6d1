"""The next token of every sequence of a step at once (`Sampler.pick`), on the logits' device.

The logits processors, each one tensor operation over a step's rows (B, V) with per-row parameters, run
in this order over all sampled rows together: n-gram bans and logit bias, a grammar's mask (structured
outputs: the tokens its matcher allows, `service.engine.grammar`), OpenAI's presence and frequency
penalties (on generated tokens), then as `transformers` does repetition penalty, temperature, top-k,
top-p; the draw is an
exponential race (argmax of p / E with E ~ Exp(1), which picks token i with probability p_i) whose noise
comes, for a seeded request, from that request's own generator on the logits' device: a seed gives the
same tokens whatever else is in the batch, on CPU and on CUDA alike. For the penalties the sampler
keeps, per slot, which tokens the prompt holds and how often each was generated, on the device,
updated with each step's tokens instead of rebuilt from the token lists. A constrained row's matcher
takes the token picked; a grammar that allows no token, or refuses the one picked, fails that request
alone.
"""

from __future__ import annotations

import torch

from service.engine.grammar import allowed
from service.engine.plan import Picked
from service.engine.sampling_params import MIN_TEMPERATURE
from service.engine.sequence import Sequence, TokenLogprob
from service.errors import RequestFailed

UNDEFINED = "sampling failed for this request: its probabilities are not finite"
DEAD_END = "the structured output allows no token here: its grammar cannot go on from what was generated"


def repeated_ngram_tokens(output: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `output` (the generated tokens only:
    copying phrases from the prompt, as a summary must, stays allowed)."""
    if n == 0 or len(output) < n:
        return []
    prefix = output[len(output) - n + 1 :]
    return [output[i + n - 1] for i in range(len(output) - n + 1) if output[i : i + n - 1] == prefix]


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on every token already in the context (`seen`, a (B, V) mask): divide positive
    logits by the row's `penalty` (B, 1), multiply negative ones."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def penalize_counts(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties over (B, V): minus `frequency` (B, 1) per time each token was generated (`counts`)
    and minus `presence` (B, 1) once for each token generated at all."""
    return logits - frequency * counts - presence * (counts > 0)


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p over (B, V) with one sort: `top_k` (B,) of at least 1 (V: off), `top_p` (B,)
    (above 1: off). As `transformers` does: top-k keeps ties with the k-th logit; top-p keeps the
    smallest set whose mass reaches p, always with the most likely token."""
    ordered, order = logits.sort(-1, descending=True)
    kth = ordered.gather(1, (top_k - 1)[:, None])
    drop = ordered < kth
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(-1)
    drop |= probs.cumsum(-1) - probs >= top_p[:, None]  # keep the token that crosses top_p
    drop[:, 0] = False  # and the most likely one, whatever top_p is (1e-300 is 0 in float32)
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability under its logits (T, V), and the `top` best: one
    log-softmax, gather and top-k for all rows."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(c, []) for c in chosen]
    best = torch.topk(logp, top)
    pairs = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    return [TokenLogprob(c, p) for c, p in zip(chosen, pairs)]


def biased(logits: torch.Tensor, outputs: list[list[int]], params: list) -> torch.Tensor:
    """`logits` (rows, V), out of place, after the processors that need no per-slot counts: each row's
    tokens that would repeat an n-gram of its output so far (`no_repeat_ngram`) at -inf, and its
    `logit_bias` added."""
    device = logits.device
    pairs = enumerate(zip(outputs, params))
    banned = [(r, t) for r, (made, p) in pairs for t in repeated_ngram_tokens(made, p.no_repeat_ngram)]
    if banned:
        at = tuple(torch.tensor(banned, device=device).T)
        logits = logits.index_put(at, torch.tensor(float("-inf"), device=device))
    added = [(r, t, v) for r, p in enumerate(params) for t, v in p.logit_bias]
    if added:
        rows, cols, values = zip(*added)
        at = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits = logits.index_put(at, torch.tensor(values, device=device), accumulate=True)
    return logits


class Sampler:
    """The next token of each sequence of a step, for the slots of one cache (its penalty state grows to
    the highest slot it has seen)."""

    def __init__(self):
        self.prompt: torch.Tensor | None = None  # (slots, V) bool: the tokens of the slot's prompt
        self.counts: torch.Tensor | None = None  # (slots, V) int32: how often the slot's sequence made each
        self.owner: list[Sequence | None] = []  # whose tokens the rows of a slot hold

    def pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | RequestFailed]:
        """Each sequence's next token from its row of `logits` (B, V); a sampled row whose probabilities
        are not defined (non-finite logits) gets a `RequestFailed` instead: the other rows go on."""
        if all(s.params.greedy for s in seqs):
            return logits.argmax(-1).tolist()
        return self._sample(seqs, logits.float())

    def picked(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Picked]:
        """`pick`'s tokens as the step's output, with each token's log-probability where the sequence asks."""
        out = []
        for s, row, token in zip(seqs, logits, self.pick(seqs, logits)):
            if isinstance(token, RequestFailed):
                out.append(Picked(s, error=token))
            elif s.params.logprobs is not None:
                out.append(Picked(s, (token,), tuple(token_logprobs(row[None], [token], s.params.logprobs))))
            else:
                out.append(Picked(s, (token,)))
        return out

    def verified(self, s: Sequence, logits: torch.Tensor, draft: list[int]) -> Picked:
        """The tokens a greedy sequence takes from the logits (1 + len(draft), V) of its verified draft
        (`ModelRunner.execute`): each draft token while it is the token plain decoding would pick there
        (the argmax after `biased`: banned n-gram repeats, logit bias, and a grammar's mask, as in
        `pick`), then that pick where they part, or after the whole draft. A grammar's matcher takes
        the tokens taken, and only those: a refused draft token never reaches it."""
        p = s.params
        if p.greedy:
            best = logits.argmax(-1).tolist()
            agreed = next((i for i, (a, b) in enumerate(zip(draft, best)) if a != b), len(draft))
            return Picked(s, tuple(draft[:agreed] + [best[agreed]]))
        out: list[int] = []
        for row in logits.float():
            row = biased(row[None], [s.output + out], [p])
            if p.grammar is not None:
                row, dead = self._constrain(row, [s], [0])
                token = int(row[0].argmax())
                if dead or not s.matcher.consume_token(token):  # (what it took stays taken)
                    return Picked(s, tuple(out)) if out else Picked(s, error=RequestFailed(DEAD_END))
            else:
                token = int(row[0].argmax())
            out.append(token)
            if len(out) > len(draft) or token != draft[len(out) - 1]:
                break
        return Picked(s, tuple(out))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | RequestFailed]:
        device, vocab = logits.device, logits.shape[1]
        params = [s.params for s in seqs]
        logits = biased(logits, [s.output for s in seqs], params)
        constrained = [r for r, p in enumerate(params) if p.grammar is not None]
        dead = set()
        if constrained:
            logits, dead = self._constrain(logits, [seqs[r] for r in constrained], constrained)
        penalized = [r for r, p in enumerate(params) if p.counts_tokens]
        if penalized:
            at = torch.tensor(penalized, device=device)

            def column(name: str) -> torch.Tensor:
                return torch.tensor([[getattr(params[r], name)] for r in penalized], device=device)

            prompt, counts = self._state([seqs[r] for r in penalized], vocab, device)
            rows = penalize_counts(logits[at], counts, column("presence_penalty"), column("frequency_penalty"))
            rows = penalize_repeats(rows, prompt | (counts > 0), column("repetition_penalty"))
            logits = logits.index_copy(0, at, rows)
        tokens = logits.argmax(-1)
        failed = torch.zeros_like(tokens)
        drawn = [r for r, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]  # the rest are greedy
        if drawn:
            at = torch.tensor(drawn, device=device)
            draws, undefined = self._draw([seqs[r] for r in drawn], logits[at])
            tokens, failed = tokens.index_copy(0, at, draws), failed.index_copy(0, at, undefined.long())
        rows = torch.stack([tokens, failed]).tolist()  # the step's one copy to the host
        out = [RequestFailed(UNDEFINED) if f else t for t, f in zip(*rows)]
        for r in constrained:
            if r in dead or (isinstance(out[r], int) and not seqs[r].matcher.consume_token(out[r])):
                out[r] = RequestFailed(DEAD_END)
        if penalized:
            self._count([seqs[r] for r in penalized], [out[r] for r in penalized])
        return out

    @staticmethod
    def _constrain(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> tuple[torch.Tensor, set[int]]:
        """`logits` with each constrained row's disallowed tokens at -inf, and the rows whose grammar
        allows nothing (or whose matcher is in its error state, or missing)."""
        have = [(r, s) for r, s in zip(rows, seqs) if s.matcher is not None and not s.matcher.is_error()]
        dead = set(rows) - {r for r, _ in have}
        if have:
            mask = allowed([s.matcher for _, s in have], logits.shape[1]).to(logits.device)
            dead |= {r for (r, _), any_ in zip(have, mask.any(-1).tolist()) if not any_}
            at = torch.tensor([r for r, _ in have], device=logits.device)
            logits = logits.index_copy(0, at, logits[at].masked_fill(~mask, float("-inf")))
        return logits, dead

    def _draw(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A token from each row's distribution after temperature, top-k and top-p, and whether that
        distribution was undefined (NaN), both on the device."""
        device, vocab, params = logits.device, logits.shape[1], [s.params for s in seqs]
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        if any(p.top_p < 1.0 for p in params):  # one sort serves both
            top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=device)
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device)
            logits = truncate(logits, top_k, top_p)
        elif any(p.top_k for p in params):  # top-k alone: a partial sort
            k = min(max(p.top_k for p in params), vocab)
            best = logits.topk(k, -1).values
            at = torch.tensor([min(p.top_k, vocab) - 1 if p.top_k else 0 for p in params], device=device)
            kth = best.gather(1, at[:, None]).masked_fill(
                torch.tensor([[not p.top_k] for p in params], device=device), float("-inf")
            )
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        noise = torch.empty_like(probs).exponential_()
        for r, s in enumerate(seqs):
            if s.params.seed is not None:  # the request's own draws: the same whatever else is in the batch
                noise[r].exponential_(generator=self._generator(s, device))
        return probs.div(noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1), probs.isnan().any(-1)

    @staticmethod
    def _generator(s: Sequence, device: torch.device) -> torch.Generator:
        """The request's own generator, on the logits' device, seeded once."""
        if s.generator is None:
            s.generator = torch.Generator(device=device).manual_seed(s.params.seed)
        return s.generator

    def _state(self, seqs: list[Sequence], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(seqs), V) each: which tokens each sequence's prompt holds, and how often it generated each,
        from its slot's rows (filled from the token lists when the slot holds a new sequence)."""
        slots = max(s.slot for s in seqs) + 1
        if self.prompt is None or self.prompt.shape[0] < slots:
            prompt = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
            counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
            if self.prompt is not None:
                prompt[: self.prompt.shape[0]], counts[: self.counts.shape[0]] = self.prompt, self.counts
            self.prompt, self.counts = prompt, counts
            self.owner += [None] * (slots - len(self.owner))
        for s in seqs:
            if self.owner[s.slot] is not s:
                self.owner[s.slot] = s
                self.prompt[s.slot] = False
                self.prompt[s.slot, torch.tensor(s.prompt, dtype=torch.long, device=device)] = True
                made = torch.tensor(s.output, dtype=torch.long, device=device)
                self.counts[s.slot] = torch.bincount(made, minlength=vocab)[:vocab]
        slots = torch.tensor([s.slot for s in seqs], device=device)
        return self.prompt[slots], self.counts[slots]

    def _count(self, seqs: list[Sequence], tokens: list[int | RequestFailed]) -> None:
        """Add this step's tokens to the counts of their slots (a failed row adds none)."""
        made = [(s.slot, t) for s, t in zip(seqs, tokens) if isinstance(t, int)]
        if made:
            at = tuple(torch.tensor(made, device=self.counts.device).T)
            one = torch.ones(len(made), dtype=torch.int32, device=self.counts.device)
            self.counts.index_put_(at, one, accumulate=True)
