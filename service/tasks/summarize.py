"""Abstractive summaries with length control.

Prompts go through the model's chat template when it has one; decoding is greedy by default, so the
same input gives the same output. A document longer than the context goes through map-reduce, never
silent truncation; one that does not get shorter that way raises `ContextOverflow`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from model.registry import NO_NGRAM_BLOCK
from service.engine.generator import TextGenerator
from service.engine.sampling_params import SamplingParams
from service.errors import ContextOverflow, InvalidRequest
from service.tasks.plans import Generate, Plan, run_plan
from service.tasks.sentences import sentences
from service.tasks.text import content_words, split_to_fit, whole_sentences

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
# phrase in one summary is steered away from, numbers included where each digit is a token ("25,000 ...
# 10,000" became "10,00"): the models of `model.registry.NO_NGRAM_BLOCK`, measured not to loop, go without.
SUMMARY_NO_REPEAT_NGRAM = 4
MAP_INSTRUCTION = "in about 3 sentences"  # the map step of map-reduce
LENGTHS = {"short": (1, 60), "medium": (3, 150), "long": (5, 260)}  # sentences, token budget


@dataclass
class Summary:
    summary: str
    prompt_tokens: int
    completion_tokens: int
    citations: list[dict] | None = None  # documents (`service.tasks.document_summary`): each sentence's file and part
    rounds: int = 0  # map-reduce rounds (0: the document fit the context)
    windows: int = 0  # pieces summarized in those rounds


def summary_messages(document: str, instruction: str, rewrite: bool = False) -> list[dict[str, str]]:
    ask = f"{REWRITE_INSTRUCTION} {instruction}" if rewrite else f"Summarize the following document {instruction}"
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": f"{ask}.\n\n{document}"}]


def ngram_block(gen: TextGenerator) -> int:
    """The `no_repeat_ngram` of this model's summaries: 0 for the models measured not to loop."""
    return 0 if gen.name in NO_NGRAM_BLOCK else SUMMARY_NO_REPEAT_NGRAM


def stop_after(n: int):
    """An `on_text` that stops generation as soon as a sentence beyond the `n` asked for begins (that
    piece is not streamed), so the stream and the token count end where the summary does."""
    text = ""

    def on_piece(i: int, piece: str) -> bool:
        nonlocal text
        if len(sentences(text + piece)) > n:
            return True
        text += piece
        return False

    return on_piece


def salient(text: str, k: int) -> str | None:
    """The k most salient sentences in document order, or None when the text has no more than k."""
    found = sentences(text)
    if len(found) <= k:
        return None
    words = [content_words(s) for s in found]
    counts = collections.Counter(w for ws in words for w in ws)

    def salience(i: int) -> float:  # words the sentence shares with the others, per word (damped), by position
        return sum(counts[w] - 1 for w in words[i]) / (len(words[i]) + 5) / (1 + SALIENT_DECAY * i)

    chosen = sorted(sorted(range(len(found)), key=salience, reverse=True)[:k])
    return " ".join(found[i] for i in chosen)


def summarize(
    gen: TextGenerator,
    document: str,
    length: str = "medium",
    max_words: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    priority: int = 0,
    progress=None,
) -> Summary:
    """`summarize_plan` run on this thread (`progress`: see `run_plan`)."""
    return run_plan(gen, summarize_plan(gen, document, length, max_words, temperature, seed), priority, progress)


def summarize_plan(
    gen: TextGenerator,
    document: str,
    length: str = "medium",
    max_words: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    key_sentences: bool = True,
) -> Plan:
    """An abstractive summary. A document that fits the context goes to the model as its key sentences
    (`salient`: prose, news), or without `key_sentences` as it is (a structured document: its slides'
    titles, a table's header row and every part must reach the model). A document longer than the context goes
    through map-reduce: its pieces are summarized (in one generation), then the joined summaries are
    summarized, again if needed. Streams the final summary's text."""
    if not isinstance(document, str) or not document.strip():
        raise InvalidRequest("document is empty")
    document = document.strip()
    if not isinstance(length, str) or length not in LENGTHS:
        raise InvalidRequest(f"length must be one of {', '.join(LENGTHS)}, got {length!r}")
    count, budget = LENGTHS[length]
    if max_words is not None:
        if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
            raise InvalidRequest(f"max_words must be a whole number of at least 1, got {max_words!r}")
        instruction, budget = f"in at most {max_words} words", int(max_words * 1.5) + 16
    else:
        instruction = "in one sentence" if count == 1 else f"in about {count} sentences"
    params = SamplingParams(max_tokens=budget, temperature=temperature, seed=seed, no_repeat_ngram=ngram_block(gen))
    chat, context = gen.tokenizer.chat, gen.engine.context
    if len(chat(summary_messages(document, instruction))) + budget > context:
        return (yield from map_reduce(gen, document, length, max_words, temperature, seed))
    key = salient(document, max(5, count + 2)) if key_sentences else None
    ids = chat(summary_messages(key or document, instruction, rewrite=key is not None))
    r = (yield Generate([ids], [params], True, stop_after(count) if max_words is None else None))[0]
    text = " ".join(r.text.split())
    if max_words is not None:
        text = " ".join(text.split()[:max_words])
    if r.finish_reason == "length":
        text = whole_sentences(text)
    if max_words is None:
        text = " ".join(sentences(text)[:count])  # as many sentences as asked for
    return Summary(text, r.prompt_tokens, r.completion_tokens)


def map_room(gen: TextGenerator) -> int:
    """Tokens of text one map step of `map_reduce` takes: the context less the map prompt and its summary."""
    _, map_budget = LENGTHS["medium"]
    return gen.engine.context - map_budget - len(gen.tokenizer.chat(summary_messages(".", MAP_INSTRUCTION)))


def map_reduce(
    gen: TextGenerator,
    document: str,
    length: str,
    max_words: int | None,
    temperature: float,
    seed: int | None,
    cut=None,
) -> Plan:
    """The pieces of `document` summarized in one generation, then their summaries summarized.
    `cut(room)` gives the pieces, each of at most `room` tokens (`map_room`; default: at sentence ends,
    `split_to_fit`; `service.tasks.document_summary` cuts along a document's parts)."""
    chat = gen.tokenizer.chat
    _, map_budget = LENGTHS["medium"]
    room = map_room(gen)
    if room < 64:
        gen.engine.limits.check_fits(len(chat(summary_messages(".", MAP_INSTRUCTION))) + 64, map_budget)
    pieces = cut(room) if cut else split_to_fit(gen, document, room)
    map_params = SamplingParams(
        max_tokens=map_budget, temperature=temperature, seed=seed, no_repeat_ngram=ngram_block(gen)
    )
    prompts = [chat(summary_messages(p, MAP_INSTRUCTION)) for p in pieces]
    partial = yield Generate(prompts, [map_params] * len(prompts), stage="map")
    joined = "\n".join(whole_sentences(" ".join(r.text.split())) for r in partial if r.text.strip())
    if not joined or len(gen.tokenizer.encode(joined)) >= len(gen.tokenizer.encode(document)):
        raise ContextOverflow("the document does not get shorter when summarized in pieces; send less text")
    final = yield from summarize_plan(gen, joined, length, max_words, temperature, seed)
    return Summary(
        final.summary,
        final.prompt_tokens + sum(r.prompt_tokens for r in partial),
        final.completion_tokens + sum(r.completion_tokens for r in partial),
        rounds=final.rounds + 1,
        windows=final.windows + len(prompts),
    )
