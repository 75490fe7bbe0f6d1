"""Where an answer or a summary comes from, as character offsets a front-end can highlight: the sentence
of a passage that supports an answer (`supporting_span`) and, for each sentence of a summary, the
sentence of the documents it shares the most content words with (`sentence_sources`). Sentences are the
one splitter's (`service.tasks.sentences`), found back in the text they came from."""

from __future__ import annotations

from service.tasks.answer import support
from service.tasks.document_summary import most_shared
from service.tasks.sentences import sentences
from service.tasks.text import content_words


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) character offsets of each sentence of `text`, in order."""
    spans, at = [], 0
    for s in sentences(text):
        start = text.find(s, at)
        if start == -1:  # (the splitter only strips: a sentence is always found; kept safe all the same)
            continue
        spans.append((start, start + len(s)))
        at = start + len(s)
    return spans


def supporting_span(answer: str, question: str, passage: str) -> tuple[int, int] | None:
    """The sentence of `passage` that supports `answer` best (shares the most of its content words beyond the
    question's), or None when none shares one."""
    scored = [(support(answer, question, passage[a:b]), (a, b)) for a, b in sentence_spans(passage)]
    best = max(scored, key=lambda x: x[0], default=(0, None))
    return best[1] if best[0] > 0 else None


def sentence_sources(summary: str, documents: list[str]) -> list[dict]:
    """Each sentence of `summary` with the document sentence it shares the most content words with (at
    least `MIN_SHARED`, as `most_shared` finds it): {"text", "source": {"document", "start", "end", "text"}
    or None}."""
    found = [(i, a, b) for i, d in enumerate(documents) for a, b in sentence_spans(d)]
    words = [content_words(documents[i][a:b]) for i, a, b in found]
    out = []
    for sentence in sentences(summary):
        best = most_shared(sentence, words)
        source = None
        if best is not None:
            i, a, b = found[best]
            source = {"document": i, "start": a, "end": b, "text": documents[i][a:b]}
        out.append({"text": sentence, "source": source})
    return out
