"""The two tasks: direct full-sentence answers and abstractive summaries.

Prompts go through the model's chat template when it has one. Both tasks decode greedily by
default, so the same input gives the same output. Input longer than the context is cut into windows
(answers) or goes through map-reduce (summaries); an input that still cannot fit raises
`ContextOverflow` naming the numbers.

Each task is a plan (`answer_plan`, `summarize_plan`): a generator that yields the generations it needs
(`Generate`) and gets their results back, so that the same plan runs on a calling thread (`run_plan`,
behind `answer` and `summarize`) and on the server's event loop (`service.engine.handle.TaskRun`), where the
CPU work between generations runs off the loop and no thread waits for the engine.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass

from service.engine.generator import TextGenerator
from service.engine.sampling import SamplingParams
from service.errors import ContextOverflow

# Chosen on a random sample of SQuAD and NQ-open dev questions (full-sentence and restatement rate).
ANSWER_SYSTEM = "You answer questions in one complete sentence that repeats the subject of the question."
ANSWER_INSTRUCTION = "Answer in one complete sentence that restates the question."
# With passages, asking for the context's own words lifted SQuAD containment on the first 50 dev
# questions from 52% to 60% (full sentences 100% both); see the README's quality section.
ANSWER_FROM_CONTEXT = (
    "Answer in one complete sentence that restates the question, using the exact words of the context."
)
SUMMARY_SYSTEM = "You write accurate, concise abstractive summaries in your own words."
# A 135M model summarizes a whole article poorly (ROUGE-1 ~25 on CNN/DM) but rewrites a few chosen
# sentences well: the document's most salient sentences (content words shared with the rest of the
# document, with a prior for early sentences) go to the model to be rewritten, and the result is cut
# to the sentences asked for. Tuning figures are in the README's quality section.
SALIENT_DECAY = 1.0  # position prior: sentence i's salience is divided by 1 + i
REWRITE_INSTRUCTION = "Rewrite the key sentences below as a summary"
# Greedy decoding of a small model loops ("The video is at CNN.com. The video is at CNN.com. ...");
# blocking repeated 4-grams of generated tokens (as BART/PEGASUS summarizers do with 3) stopped that and
# raised ROUGE-1 on 8 CNN/DM dev articles from 0.207 to 0.237. The price: an exact repeat of a 4-token
# phrase in one summary is steered away from.
SUMMARY_NO_REPEAT_NGRAM = 4
MAP_INSTRUCTION = "in about 3 sentences"  # the map step of map-reduce
LENGTHS = {"short": (1, 60), "medium": (3, 150), "long": (5, 260)}  # sentences, token budget

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s")
_CITATION = re.compile(r"\[\d+\]\s*")  # "[2] " markers copied from numbered passages
_WORD = re.compile(r"[A-Za-z0-9]+")
STOPWORDS = frozenset(
    "a an the of to in on at by for with from and or but is are was were be been being it its this that these those "
    "who whom whose what which when where why how do does did has have had as not no".split()
)


Emit = Callable[[int, str], None]  # stream text of sequence i to the caller


@dataclass
class Generate:
    """One generation a plan asks for; it is sent back the results, one per prompt. `on_text(i, piece,
    emit)` sees each final piece of sequence i (True stops it) and may `emit` text to the caller."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    on_text: Callable[[int, str, Emit], bool | None] | None = None


def forward(i: int, piece: str, emit: Emit) -> None:
    """An `on_text` that streams every piece."""
    emit(i, piece)


Plan = Generator[Generate, list, object]


def run_plan(gen: TextGenerator, plan: Plan, on_text=None, cancelled=None, priority: int = 0):
    """Run a plan on this thread, each generation through `gen.generate`; returns the plan's value.
    `on_text(text)` receives what the plan streams."""
    emit = (lambda i, text: on_text(text)) if on_text else (lambda i, text: None)
    results = None
    while True:
        try:
            step = plan.send(results)
        except StopIteration as stop:
            return stop.value
        watch = (lambda i, piece, step=step: step.on_text(i, piece, emit)) if step.on_text else None
        results = gen.generate(step.prompts, step.params, watch, cancelled, priority)


@dataclass
class Answer:
    answer: str
    passage_index: int | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Summary:
    summary: str
    prompt_tokens: int
    completion_tokens: int


def first_sentence(text: str) -> str:
    """The first complete sentence, ending in punctuation (one is added when the model stopped short)."""
    text = " ".join(_CITATION.sub("", text).split())
    m = _SENTENCE_END.search(text + " ")
    sentence = text[: m.end()].strip() if m else text
    if sentence and sentence[-1] not in ".!?\"')":
        sentence += "."
    return sentence


def whole_sentences(text: str) -> str:
    """Drop a last sentence that was cut off by the token budget (keep the text if it is the only one)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text + " ")]
    return text[: ends[-1]].strip() if ends else text


def content_words(text: str) -> set[str]:
    return {w for w in (x.lower() for x in _WORD.findall(text)) if w not in STOPWORDS}


def support(answer: str, question: str, text: str) -> int:
    """How many of the answer's content words beyond those of the question `text` contains."""
    return len((content_words(answer) - content_words(question)) & content_words(text))


def supporting_passage(answer: str, question: str, passages: list[str]) -> int | None:
    """The passage that best supports the answer (None when none shares a new content word)."""
    scores = [support(answer, question, p) for p in passages]
    if not scores or max(scores) == 0:
        return None
    return scores.index(max(scores))


def split_to_fit(gen: TextGenerator, text: str, room: int) -> list[str]:
    """Cut `text` into pieces of at most `room` tokens, at sentence ends where possible (a sentence
    longer than `room` is cut between tokens). Nothing is dropped. Sentences are counted one by one,
    so 5% of `room` is kept free for tokens that merge differently across a join."""
    tok, pieces, current, used = gen.tokenizer, [], [], 0
    room -= max(1, room // 20)
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        if not sentence.strip():
            continue
        n = len(tok.encode(" " + sentence))
        if n > room:
            ids = tok.encode(sentence)
            pieces += [" ".join(current)] if current else []
            pieces += [tok.decode(ids[i : i + room]) for i in range(0, len(ids), room)]
            current, used = [], 0
        elif used + n > room:
            pieces.append(" ".join(current))
            current, used = [sentence], n
        else:
            current.append(sentence)
            used += n
    return pieces + ([" ".join(current)] if current else [])


def answer_source(question: str, passages: list[str]) -> str:
    """What an answer is checked against (support, novelty): the question and its passages."""
    return "\n".join([question, *passages])


def answer_messages(question: str, passages: list[str]) -> list[dict[str, str]]:
    context = ""
    if len(passages) == 1:
        context = f"Context:\n{passages[0]}\n\n"
    elif passages:
        context = "Context:\n" + "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages)) + "\n\n"
    return [
        {"role": "system", "content": ANSWER_SYSTEM},
        {
            "role": "user",
            "content": f"{context}Question: {question}\n{ANSWER_FROM_CONTEXT if passages else ANSWER_INSTRUCTION}",
        },
    ]


def answer(
    gen: TextGenerator,
    question: str,
    passages: list[str] = (),
    max_tokens: int = 80,
    temperature: float = 0.0,
    seed: int | None = None,
    priority: int = 0,
    cancelled=None,
    on_text=None,
) -> Answer:
    """`answer_plan` run on this thread."""
    return run_plan(
        gen, answer_plan(gen, question, passages, max_tokens, temperature, seed), on_text, cancelled, priority
    )


def answer_plan(
    gen: TextGenerator,
    question: str,
    passages: list[str] = (),
    max_tokens: int = 80,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Plan:
    """One full sentence. Passages that do not fit the context together are cut into windows that do
    (the question is never cut); each window gets an answer, and the one best supported by its window
    wins. Streams the raw text when there is one window."""
    question = question.strip()
    if not question:
        raise ValueError("question is empty")
    passages = [p.strip() for p in passages]
    if any(not p for p in passages):
        raise ValueError("a passage is empty")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    chat, context = gen.tokenizer.chat, gen.engine.context
    ids = chat(answer_messages(question, passages))
    windows = None  # (passage index, piece) when the passages had to be cut to fit
    if passages and len(ids) + max_tokens > context:
        room = context - max_tokens - len(chat(answer_messages(question, ["."])))
        if room < 16:
            gen.engine.check_fits(len(chat(answer_messages(question, []))) + 16, max_tokens)
        windows = [(i, piece) for i, p in enumerate(passages) for piece in split_to_fit(gen, p, room)]
        prompts = [chat(answer_messages(question, [piece])) for _, piece in windows]
    else:
        prompts = [ids]
        gen.engine.check_fits(len(ids), max_tokens)  # refused here, naming the numbers, if it does not fit
    results = yield Generate(prompts, [params] * len(prompts), forward if len(prompts) == 1 else None)
    texts = [first_sentence(r.text) for r in results]
    if windows is None:
        best, index = 0, supporting_passage(texts[0], question, passages)
    else:
        scores = [support(t, question, piece) for t, (_, piece) in zip(texts, windows)]
        best = scores.index(max(scores))
        index = windows[best][0] if scores[best] > 0 else None
    return Answer(texts[best], index, sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))


def summary_messages(document: str, instruction: str, rewrite: bool = False) -> list[dict[str, str]]:
    ask = f"{REWRITE_INSTRUCTION} {instruction}" if rewrite else f"Summarize the following document {instruction}"
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": f"{ask}.\n\n{document}"}]


def sentences_of(text: str) -> list[str]:
    return [s for s in (x.strip() for x in re.split(r"(?<=[.!?])\s+|\n+", text)) if s]


def stop_after(n: int):
    """An `on_text` that stops generation as soon as a sentence beyond the `n` asked for begins (that
    piece is not emitted), so the stream and the token count end where the summary does."""
    text = ""

    def on_piece(i: int, piece: str, emit: Emit) -> bool:
        nonlocal text
        if len(sentences_of(text + piece)) > n:
            return True
        text += piece
        emit(i, piece)
        return False

    return on_piece


def salient(text: str, k: int) -> str | None:
    """The k most salient sentences in document order, or None when the text has no more than k."""
    sentences = sentences_of(text)
    if len(sentences) <= k:
        return None
    words = [content_words(s) for s in sentences]
    counts = collections.Counter(w for ws in words for w in ws)

    def salience(i: int) -> float:  # words the sentence shares with the others, per word (damped), by position
        return sum(counts[w] - 1 for w in words[i]) / (len(words[i]) + 5) / (1 + SALIENT_DECAY * i)

    chosen = sorted(sorted(range(len(sentences)), key=salience, reverse=True)[:k])
    return " ".join(sentences[i] for i in chosen)


def summarize(
    gen: TextGenerator,
    document: str,
    length: str = "medium",
    max_words: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    priority: int = 0,
    cancelled=None,
    on_text=None,
) -> Summary:
    """`summarize_plan` run on this thread."""
    plan = summarize_plan(gen, document, length, max_words, temperature, seed)
    return run_plan(gen, plan, on_text, cancelled, priority)


def summarize_plan(
    gen: TextGenerator,
    document: str,
    length: str = "medium",
    max_words: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Plan:
    """An abstractive summary. A document longer than the context goes through map-reduce: its
    pieces are summarized (in one generation), then the joined summaries are summarized, again if
    needed. Streams the final summary's text."""
    if not isinstance(document, str) or not document.strip():
        raise ValueError("document is empty")
    document = document.strip()
    if not isinstance(length, str) or length not in LENGTHS:
        raise ValueError(f"length must be one of {', '.join(LENGTHS)}, got {length!r}")
    sentences, budget = LENGTHS[length]
    if max_words is not None:
        if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
            raise ValueError(f"max_words must be a whole number of at least 1, got {max_words!r}")
        instruction, budget = f"in at most {max_words} words", int(max_words * 1.5) + 16
    else:
        instruction = "in one sentence" if sentences == 1 else f"in about {sentences} sentences"
    params = SamplingParams(
        max_tokens=budget, temperature=temperature, seed=seed, no_repeat_ngram=SUMMARY_NO_REPEAT_NGRAM
    )
    chat, context = gen.tokenizer.chat, gen.engine.context
    if len(chat(summary_messages(document, instruction))) + budget > context:
        return (yield from _map_reduce(gen, document, length, max_words, params))
    key = salient(document, max(5, sentences + 2))
    ids = chat(summary_messages(key or document, instruction, rewrite=key is not None))
    r = (yield Generate([ids], [params], stop_after(sentences) if max_words is None else forward))[0]
    text = " ".join(r.text.split())
    if max_words is not None:
        text = " ".join(text.split()[:max_words])
    if r.finish_reason == "length":
        text = whole_sentences(text)
    if max_words is None:
        text = " ".join(sentences_of(text)[:sentences])  # as many sentences as asked for
    return Summary(text, r.prompt_tokens, r.completion_tokens)


def _map_reduce(gen: TextGenerator, document: str, length: str, max_words: int | None, params: SamplingParams) -> Plan:
    chat, context = gen.tokenizer.chat, gen.engine.context
    _, map_budget = LENGTHS["medium"]
    room = context - map_budget - len(chat(summary_messages(".", MAP_INSTRUCTION)))
    if room < 64:
        gen.engine.check_fits(len(chat(summary_messages(".", MAP_INSTRUCTION))) + 64, map_budget)
    pieces = split_to_fit(gen, document, room)
    map_params = SamplingParams(
        max_tokens=map_budget, temperature=params.temperature, seed=params.seed, no_repeat_ngram=params.no_repeat_ngram
    )
    prompts = [chat(summary_messages(p, MAP_INSTRUCTION)) for p in pieces]
    partial = yield Generate(prompts, [map_params] * len(prompts))
    joined = "\n".join(whole_sentences(" ".join(r.text.split())) for r in partial if r.text.strip())
    if not joined or len(gen.tokenizer.encode(joined)) >= len(gen.tokenizer.encode(document)):
        raise ContextOverflow("the document does not get shorter when summarized in pieces; send less text")
    final = yield from summarize_plan(gen, joined, length, max_words, params.temperature, params.seed)
    return Summary(
        final.summary,
        final.prompt_tokens + sum(r.prompt_tokens for r in partial),
        final.completion_tokens + sum(r.completion_tokens for r in partial),
    )
