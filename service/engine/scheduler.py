"""Continuous batching over one paged KV cache (`Scheduler`): which sequences run, which tokens each one
feeds, which blocks each holds. Each `schedule()` gives the running sequences the blocks their next
tokens need, admits waiting sequences while a slot and blocks are free, plans prompt chunks within a
per-step token budget (so a long prompt does not stall running streams) and one decode token for every
sequence past its prompt: a `service.engine.plan.StepPlan`. `update(plan, output)` records what the model
runner picked (`StepOutput`), applies the stop rules (end tokens, max_tokens) and frees the slots and
blocks of what finished. The
scheduler makes no model call and never sees the runner: `service.engine.core.Engine` passes the values.

Blocks (`service.engine.blocks.BlockPool`): a new sequence starts from the cached blocks of its longest
cached prefix and prefills only the rest (unless that prefix is short, under `AWAY_HIT` tokens or half the
prompt, and lies away from any free slot's home region, where reading it would cost a gather at every
step). A sequence that arrives alone (none runs, none waits beside it) and brings no cached prefix of its
own home (or only a short one, a system prompt, followed there by another prompt's cached blocks, when a
slot used longer ago is free) takes the free slot whose home would cost the cache least to write over: one
never used, else the one whose last sequence left longest ago (the lowest among equals), so that the
prompts of users taking turns each keep their home and are found there again. Beside other sequences a new
one takes the free slot that keeps the running ones' slots closest together (the lowest among equals),
so that a batch's rows stay in consecutive regions (read as one view, not copied; its decode rows go in
their slots' order). Each block it fills enters the prefix cache (unless prefix caching is off, or the request wants
prompt log-probabilities); a finished or cancelled sequence gives its blocks back at once. When a running
sequence needs a block and none is left, the youngest running sequence is preempted: it gives its blocks
back and waits again, and when it is admitted again it prefills its prompt and output so far (most of it
found in the prefix cache, unless evicted meanwhile), as vLLM's recompute preemption does. A request that
could never fit the whole cache is refused when it is added.

Prompt-lookup speculation (`SchedulerConfig.prompt_lookup`): when every decoding sequence is greedy
(processors but the count penalties allowed) and wants no log-probabilities, each one's draft
(`service.engine.lookup`, cut at the first token its grammar refuses, if it has one) is planned for
verification in one forward, and `update` takes the tokens the model agreed with and its own next token
after them: the same output in fewer steps.

Launched ahead (`SchedulerConfig.launch_ahead`, the CUDA-graph path): a greedy decode step is launched
and its tokens are collected by the next step's plan; a step over the same sequences as the one before is
launched chained to it, before the host reads that step's tokens, so the host's work per token
(bookkeeping, then the output stage's detokenizing and streaming) runs while the GPU computes the next.

What each sequence gained (its new tokens and log-probabilities, that it ended) is kept as it happens
and taken after the turn as values (`take_outputs`), for the output stage to hand to the sequence's
consumer: no consumer code runs here. A request's own failure (its sampler) ends that sequence with
`RequestFailed` and frees its slot; the step goes on for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.engine.blocks import BlockPool
from service.engine.checks import Limits
from service.engine.lookup import draft
from service.engine.plan import Launched, StepOutput, StepPlan
from service.engine.sampling_params import MIN_TEMPERATURE
from service.engine.sequence import Sequence, SequenceOutput
from service.errors import ContextOverflow

PROMPT_LOOKUP = 5  # draft tokens: on SQuAD dev answers (SmolLM2, 2-core CPU) 3 gave 1.57x, 5 1.74x, 8 1.72x
LOOKUP_ROWS = 8  # rows of a verifying forward at most, decode rows and drafts (see `Scheduler._drafts`)
AWAY_HIT = 128  # tokens a cached prefix away from a free home must have to be used (and half the prompt)


@dataclass
class SchedulerConfig:
    """What the scheduler plans with: the model's `limits`, the tokens that end a sequence (`stop_ids`,
    unless it ignores them), the prompt tokens prefilled per step at most (`step_tokens`), whether cached
    prefixes are reused (`prefix_caching`), the draft tokens verified per sequence and step (`prompt_lookup`,
    0: off) within `lookup_rows` rows of the forward, and whether greedy decode steps are launched ahead of the
    host (`launch_ahead`)."""

    limits: Limits
    stop_ids: frozenset[int] = frozenset()
    step_tokens: int = 512
    prefix_caching: bool = True
    prompt_lookup: int = 0
    lookup_rows: int = LOOKUP_ROWS
    launch_ahead: bool = False


class Scheduler:
    """Continuous batching over one cache's blocks: the sequences waiting for a slot and those holding one."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, slots: int):
        self.config, self.pool, self.slots = config, pool, slots
        self.free = set(range(slots))  # the free slots: the lowest goes first among equals (`_admit`), so that
        # a decode step's rows are the low slots (the CUDA graphs' row buckets)
        self.left_at = [0] * slots  # when each slot's last sequence left it (in admissions; 0: never used)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.ahead: Launched | None = None  # the last decode step, when launched ahead of the host
        self.admissions = 0
        self.preemptions = 0
        self.queried = self.hits = 0  # prompt tokens looked up in the prefix cache, and those found
        self.drafted = self.accepted = 0  # prompt-lookup draft tokens verified, and those taken
        self.gained: dict[Sequence, _Gained] = {}  # what each sequence gained since `take_outputs`

    def add(self, s: Sequence) -> None:
        """Queue a sequence; raises `InvalidRequest` for one the model cannot take (checked again here, on
        the engine thread, whatever the caller checked)."""
        self.config.limits.check_tokens(s.prompt)
        self.config.limits.check_fits(s.length, s.params.max_tokens)
        need, size = s.length + s.params.max_tokens, self.pool.size
        if -(-need // size) > self.pool.capacity:
            raise ContextOverflow(
                f"the request needs {need} tokens of KV cache ({s.length} in the prompt, {s.params.max_tokens} "
                f"in the completion) and the whole cache holds {self.pool.capacity * size} (--kv-cache-memory): "
                "shorten the prompt or lower max_tokens",
                param="messages",
            )
        self.waiting.append(s)

    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.ahead)

    def finish(self, s: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        """End `s` (queued, running, or never added): its slot and blocks are free, and its next output says
        it ended."""
        if s.finished:
            return
        if s in self.running:
            self._evict(s)
        elif s in self.waiting:
            self.waiting.remove(s)
        s.finish_reason, s.finished = s.finish_reason or reason, True
        gained = self._gained(s)
        gained.finished, gained.error = True, error

    def take_outputs(self) -> list[tuple[Sequence, SequenceOutput]]:
        """What each sequence gained since the last call, as values, in the order they gained it; a
        sequence's prompt log-probabilities go with its first tokens (or its end)."""
        outputs = []
        for s, g in self.gained.items():
            prompt = ()
            if s.params.prompt_logprobs is not None and not s.scored and (g.tokens or g.finished):
                prompt, s.scored = tuple(s.prompt_logprobs), True
            out = SequenceOutput(tuple(g.tokens), tuple(g.logprobs), prompt, g.prefilled, g.finished, g.error)
            outputs.append((s, out))
        self.gained = {}
        return outputs

    def abort(self, requests: set[str]) -> None:
        """End the waiting and running sequences of these requests, finish reason "cancelled"."""
        for s in [s for s in self.waiting + self.running if s.request in requests]:
            self.finish(s, "cancelled")

    def schedule(self) -> StepPlan:
        """The next step's work. After a step launched ahead: a step chained to it when every running
        sequence decodes on, none could be admitted and each has a block for the position the next step
        writes; else a step that only collects its tokens (the next plans afresh)."""
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            going_on = any(len(s.output) + 1 < s.params.max_tokens for s in ahead.seqs)  # past the token on its way
            if (
                self.running == ahead.seqs
                and going_on
                and not (self.waiting and self.free)
                and all(self._grow(s, s.length + 1, preempt=False) for s in ahead.seqs)
            ):
                return StepPlan(launch=list(ahead.seqs), chained=True, collect=ahead)
            return StepPlan(collect=ahead)
        self._admit()
        work = self._plan()
        plan = StepPlan(prefill=[(s, n) for s, n in work if not self._decoding(s)])
        decoding = [s for s, _ in work if self._decoding(s)]
        if decoding and self._launches(decoding):
            plan.launch = decoding
            return plan
        decoding.sort(key=lambda s: s.slot)  # rows in their home regions' order: read as one view (`Batch.make`)
        if decoding and any(drafts := self._drafts(decoding)):
            plan.verify = list(zip(decoding, drafts))
        else:
            plan.decode = decoding
        return plan

    def update(self, plan: StepPlan, output: StepOutput) -> None:
        """Record the step's results: what each prefilled chunk put in the cache (and its prompt
        log-probabilities), then each picked token (stop rules, finished sequences freed); keep the step
        launched ahead for the next plan to collect."""
        for s, n in plan.prefill:
            s.prefilled += n
            if not s.output:  # a prompt's progress (not a preempted sequence's recomputing)
                self._gained(s).prefilled = s.prefilled
        for s, logprobs in output.prompt_logprobs:
            s.prompt_logprobs += logprobs
        for s, _ in plan.prefill:
            self._register(s)
            if s.prefilled == s.length and s.params.max_tokens == 0:  # the prompt only was to be scored
                self.finish(s, "length")
        verified = dict(plan.verify) if plan.verify else {}
        for p in output.picked:
            s = p.seq
            if s.finished:  # finished meanwhile (cancelled, stopped, or done at the step before a chained one)
                continue
            if s in verified:
                agreed = len(p.tokens) - 1
                self.drafted, self.accepted = self.drafted + len(verified[s]), self.accepted + agreed
                s.prefilled = s.length + agreed  # the fed tokens now in the cache: all but the last one taken
            else:
                if s.prefilled == s.length - 1:  # it fed its last token: decoded
                    s.prefilled = s.length
                self._register(s)
            if p.error is not None:
                self.finish(s, error=p.error)
                continue
            s.logprobs += p.logprobs
            self._gained(s).logprobs += p.logprobs
            for token in p.tokens:
                reason = self._append(s, token)
                if reason is not None:
                    self.finish(s, reason)
                    break
            else:
                self._register(s)
        self.ahead = output.launched

    def _launches(self, decoding: list[Sequence]) -> bool:
        """Whether the decode step over `decoding` is launched ahead: every sequence takes the plain greedy
        token and wants no log-probabilities."""
        return self.config.launch_ahead and all(s.params.greedy and s.params.logprobs is None for s in decoding)

    def _drafts(self, decoding: list[Sequence]) -> list[list[int]]:
        """Each decoding sequence's prompt-lookup draft (`service.engine.lookup`), with the blocks of its
        positions: up to `prompt_lookup` tokens, fewer where the forward's rows (each sequence's decode row
        and its draft) would pass `lookup_rows`. Once a step's matmuls are bound by arithmetic rather than
        by reading the weights (a few rows of the 1.5B model on a CPU), each drafted row costs about what a
        decoded one does, and most drafts of text that copies little are refused: 8 streams of the 1.5B
        model with 5 draft tokens each (48 rows a step) ran at 35.6 tok/s, without drafts 94.9 (two Zen 4
        cores). All [] when speculation is off (`prompt_lookup` 0), when the decoding rows leave no room, or
        when a sequence samples, has a count penalty or wants log-probabilities; [] for a sequence near the
        end of its context or max_tokens, or when no block is free."""
        config, n = self.config, len(decoding)
        k = min(config.prompt_lookup, config.lookup_rows // max(n, 1) - 1)
        plain = all(  # greedy, with no processor that needs the sampler's per-slot counts
            s.params.temperature < MIN_TEMPERATURE and not s.params.counts_tokens and s.params.logprobs is None
            for s in decoding
        )
        if k < 1 or not plain:
            return [[] for _ in decoding]
        out = []
        for s in decoding:
            room = min(k, s.params.max_tokens - len(s.output) - 1)  # the step adds a token after the draft
            near_end = s.length + 2 * (k + 1 + self.pool.size) >= config.limits.context  # padding off the last position
            d = [] if near_end else draft(s.tokens(), room)
            if d and s.matcher is not None:  # the draft up to the first token its grammar refuses
                d = d[: s.matcher.validate_tokens(d)]
            out.append(d if d and self._grow(s, s.length + len(d), preempt=False) else [])
        return out

    @staticmethod
    def _decoding(s: Sequence) -> bool:
        """Past its prompt, with every token but the last in the cache: it decodes one token a step."""
        return bool(s.output) and s.prefilled == s.length - 1

    def _admit(self) -> None:
        """Give free slots to waiting sequences, first come first served by priority, while the blocks of
        each one's first chunk are free (past its cached prefix)."""
        self.waiting.sort(key=lambda s: (s.priority, s.arrival))
        size = self.pool.size
        while self.free and self.waiting:
            s = self.waiting[0]
            tokens = s.tokens()
            keys, hit = [], []
            looked = self.config.prefix_caching and s.params.prompt_logprobs is None  # (those need every logit)
            if looked:
                keys = self.pool.keys(tokens[: len(tokens) - 1])  # at least one token is computed
                hit = self.pool.match(keys)
            home = self._home_of(hit)
            alone = not self.running and len(self.waiting) == 1  # read in place anywhere: it goes where it evicts least
            oldest = min(self.free, key=lambda i: (self.left_at[i], i)) if alone else None  # the slot used longest ago
            if alone and home is not None and len(hit) * size < AWAY_HIT:
                # a short shared start (a system prompt) would write over another prompt cached there: go to
                # the slot used longest ago instead, when that one was used before this one
                own = self.pool.keys(tokens[: (len(hit) + 1) * size], keys[len(hit) - 1], len(hit))
                if self.left_at[oldest] < self.left_at[home] and self.pool.keeps(self.pool.home(home) + len(hit), own):
                    home = None
            if home is None and (2 * len(hit) * size < len(tokens) or len(hit) * size < AWAY_HIT):
                # a short prefix away from home: computing it again costs less than reading the sequence
                # (and its batch) through a gather at every step
                self.pool.release(hit)
                hit = []
            start = len(hit) * size
            first = min(len(tokens) - start, self.config.step_tokens)
            if -(-(start + first) // size) - len(hit) > self.pool.available():
                self.pool.release(hit)
                return
            self.waiting.pop(0)
            self.queried, self.hits = self.queried + looked * len(tokens), self.hits + start
            s.blocks, s.keys, s.prefilled = hit, keys[: len(hit)], start
            s.slot = home if home is not None else oldest if alone else self._beside()
            self.free.remove(s.slot)
            self.admissions += 1
            s.admitted = self.admissions
            self.running.append(s)
        self.running.sort(key=lambda s: s.slot)

    def _beside(self) -> int:
        """The free slot that keeps the running sequences' slots closest together (the lowest among equals),
        so that a batch's rows sit in consecutive home regions, read as one view (`Batch.make`): beside a
        sequence that arrived alone and took a slot in the middle, the next take the slots next to it."""
        taken = [r.slot for r in self.running]
        if not taken:
            return min(self.free)
        low, high = min(taken), max(taken)
        return min(self.free, key=lambda i: (max(high, i) - min(low, i), i))

    def _home_of(self, hit: list[int]) -> int | None:
        """The free slot whose home region holds the cached blocks `hit` (a sequence there is read in place),
        or at least their last one where it would be in place (a shared first block, a system prompt, is
        cached in the home of the sequence that computed it first: the rest is gathered), or None."""
        region = self.pool.region
        slot = -1
        if hit and hit[-1] % region == len(hit) - 1:
            slot = hit[-1] // region - 1
        elif hit and hit[0] % region == 0:
            slot = hit[0] // region - 1
        return slot if slot in self.free else None

    def _plan(self) -> list[tuple[Sequence, int]]:
        """The tokens each running sequence feeds this step (1 when it decodes, else a prompt chunk within
        the step's budget), each with the blocks they need; oldest first, so a shortage preempts the
        youngest."""
        budget, work = self.config.step_tokens, []
        for s in sorted(self.running, key=lambda s: s.admitted):
            if s not in self.running:  # preempted meanwhile
                continue
            decoding = self._decoding(s)
            n = 1 if decoding else min(s.length - s.prefilled, budget)
            if n and self._grow(s, s.prefilled + n):
                work.append((s, n))
                budget -= 0 if decoding else n
        return sorted(((s, n) for s, n in work if s in self.running), key=lambda w: w[0].slot)

    def _grow(self, s: Sequence, tokens: int, preempt: bool = True) -> bool:
        """Blocks for the first `tokens` positions of `s`; when none is left, preempt the youngest running
        sequence (or, not `preempt`, give up). False when `s` itself was preempted or it gave up."""
        while len(s.blocks) * self.pool.size < tokens:
            n = len(s.blocks)
            block = self.pool.take(self.pool.home(s.slot) + n if n < self.pool.region else None)
            if block is not None:
                s.blocks.append(block)
                continue
            if not preempt:
                return False
            victim = max(self.running, key=lambda r: r.admitted)
            self._evict(victim)
            victim.prefilled = 0
            if not victim.output:
                victim.prompt_logprobs.clear()  # computed again from the first token
            self.waiting.append(victim)
            self.preemptions += 1
            if victim is s:
                return False
        return True

    def _evict(self, s: Sequence) -> None:
        """`s` leaves the running sequences: its slot and its blocks are free."""
        self.running.remove(s)
        self.free.add(s.slot)
        self.left_at[s.slot] = self.admissions
        self.pool.release(s.blocks)
        s.blocks, s.keys = [], []

    def _register(self, s: Sequence) -> None:
        """Put the blocks `s` has filled since the last call into the prefix cache."""
        full = s.prefilled // self.pool.size
        if self.config.prefix_caching and full > len(s.keys):
            new = self.pool.keys(s.tokens()[: full * self.pool.size], s.keys[-1] if s.keys else b"", len(s.keys))
            for block, key in zip(s.blocks[len(s.keys) :], new):
                self.pool.register(block, key)
            s.keys += new

    def _append(self, s: Sequence, token: int) -> str | None:
        """Record a token; the finish reason when it ends the sequence (an end or stop token, not part of
        the output; max_tokens)."""
        if token in s.params.stop_token_ids or (token in self.config.stop_ids and not s.params.ignore_eos):
            s.end_token = token  # its log-probability stays last
            return "stop"
        s.output.append(token)
        self._gained(s).tokens.append(token)
        return "length" if len(s.output) >= s.params.max_tokens else None

    def _gained(self, s: Sequence) -> _Gained:
        gained = self.gained.get(s)
        if gained is None:
            gained = self.gained[s] = _Gained()
        return gained


@dataclass(eq=False)
class _Gained:
    """What one sequence gained in a turn, until `Scheduler.take_outputs` copies it into a `SequenceOutput`."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prefilled: int | None = None
    finished: bool = False
    error: BaseException | None = None
