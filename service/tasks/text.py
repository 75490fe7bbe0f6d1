"""Text helpers the tasks share: first and whole sentences, content words, and cutting a text into pieces
that fit (sentences from `service.tasks.sentences`)."""

from __future__ import annotations

import re

from service.engine.generator import TextGenerator
from service.tasks.sentences import is_complete, sentences

_CITATION = re.compile(r"\[\d+\]\s*")  # "[2] " markers copied from numbered passages


_WORD = re.compile(r"[A-Za-z0-9]+")
STOPWORDS = frozenset(
    "a an the of to in on at by for with from and or but is are was were be been being it its this that these those "
    "who whom whose what which when where why how do does did has have had as not no".split()
)


def first_sentence(text: str) -> str:
    """The first complete sentence, ending in punctuation (one is added when the model stopped short)."""
    found = sentences(" ".join(_CITATION.sub("", text).split()))
    sentence = found[0] if found else ""
    if sentence and not is_complete(sentence):
        sentence += "."
    return sentence


def whole_sentences(text: str) -> str:
    """Drop a last sentence that was cut off by the token budget (keep the text if it is the only one)."""
    found = sentences(text)
    if len(found) > 1 and not is_complete(found[-1]):
        found.pop()
    return " ".join(found)


def content_words(text: str) -> set[str]:
    return {w for w in (x.lower() for x in _WORD.findall(text)) if w not in STOPWORDS}


def split_to_fit(gen: TextGenerator, text: str, room: int) -> list[str]:
    """Cut `text` into pieces of at most `room` tokens, at sentence ends where possible (a sentence
    longer than `room` is cut between tokens). Nothing is dropped. Sentences are counted one by one,
    so 5% of `room` is kept free for tokens that merge differently across a join."""
    tok, blocks = gen.tokenizer, []
    room -= max(1, room // 20)
    for sentence in sentences(text):
        n = len(tok.encode(" " + sentence))
        if n <= room:
            blocks.append((sentence, n))
            continue
        ids = tok.encode(sentence)
        blocks += [(tok.decode(ids[i : i + room]), room) for i in range(0, len(ids), room)]  # each a piece
    return pack(blocks, room, " ")


def pack(blocks: list[tuple[str, int]], room: int, sep: str) -> list[str]:
    """Blocks of (text, tokens), in order, joined by `sep` into pieces of at most `room` tokens (a block
    of `room` tokens is a piece of its own)."""
    pieces, current, used = [], [], 0
    for text, n in blocks:
        if current and used + n > room:
            pieces.append(sep.join(current))
            current, used = [], 0
        current.append(text)
        used += n
    return pieces + ([sep.join(current)] if current else [])
