"""Summaries of documents along their structure (`service.documents`): a deck slide by slide, a workbook
sheet by sheet (a sheet cut in pieces keeps its header row in each), a PDF page by page, an e-mail
message by message, each part under its label. A document that fits the context is summarized whole,
labels included (not cut to its key sentences as plain text is: that kept a deck's first slide and
dropped a table's header row); a longer one goes through `service.tasks.summarize.map_reduce`, its
pieces groups of whole parts (a part longer than the context on its own is cut at sentence ends). Each
sentence of the summary then cites the part it shares the most content words with, when it shares two
or more.
"""

from __future__ import annotations

from functools import partial

from service.documents import Document
from service.engine.generator import TextGenerator
from service.tasks.plans import Plan
from service.tasks.sentences import sentences
from service.tasks.summarize import map_reduce, map_room, summarize_plan
from service.tasks.text import content_words, pack, split_to_fit

MIN_SHARED = 2  # content words a summary sentence must share with a part to cite it


def document_plan(
    gen: TextGenerator,
    docs: list[Document],
    length: str = "medium",
    max_words: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Plan:
    """The summary of `docs` (`Summary.citations`: each sentence's file and part, where found)."""
    parts = [(d, p) for d in docs for p in d.parts]
    whole = "\n\n".join(d.text() for d in docs)
    room = map_room(gen)
    if len(gen.tokenizer.encode(whole)) <= room or room < 64:
        s = yield from summarize_plan(gen, whole, length, max_words, temperature, seed, key_sentences=False)
    else:
        labelled = [(f"{d.name}, {p.label}", p.text) for d, p in parts]
        s = yield from map_reduce(gen, whole, length, max_words, temperature, seed, cut=partial(_groups, gen, labelled))
    s.citations = cite(s.summary, [(d.name, p.label, p.text) for d, p in parts])
    return s


def _groups(gen: TextGenerator, parts: list[tuple[str, str]], room: int) -> list[str]:
    """Whole labelled parts packed in order into pieces of at most `room` tokens; a part too long alone is
    cut at sentence ends, each cut under its label (and, for a table, its header row)."""
    blocks = []
    for label, text in parts:
        block = f"[{label}]\n{text}"
        n = len(gen.tokenizer.encode(block))
        if n <= room:
            blocks.append((block, n))
            continue
        lines = text.splitlines()
        header = "\n".join(lines[:2]) + "\n" if len(lines) > 2 and lines[0].startswith("|") else ""
        head = f"[{label}]\n{header}"
        cut = split_to_fit(gen, text[len(header) :], room - len(gen.tokenizer.encode(head)))
        blocks += [(head + c, room) for c in cut]  # each a piece of its own
    return pack(blocks, room, "\n\n")


def cite(summary: str, parts: list[tuple[str, str, str]]) -> list[dict]:
    """Each sentence of `summary` with the (file, part) it shares the most content words with (at least
    `MIN_SHARED`), else with none."""
    words = [content_words(text) for _, _, text in parts]
    out = []
    for sentence in sentences(summary):
        best = most_shared(sentence, words)
        found = best is not None
        out.append(
            {"sentence": sentence, "file": parts[best][0] if found else None, "part": parts[best][1] if found else None}
        )
    return out


def most_shared(sentence: str, words: list[set[str]]) -> int | None:
    """The index of the content-word set `sentence` shares the most words with (the first of equals),
    when it shares at least `MIN_SHARED`; else None."""
    mine = content_words(sentence)
    shared = [len(mine & w) for w in words]
    best = max(range(len(words)), key=lambda i: shared[i], default=None)
    return best if best is not None and shared[best] >= MIN_SHARED else None
