"""Passages cut along a document's structure and ranked for a question (`service.retrieval`): offsets
that point back into the part's text, and the passage holding the answer ranked first on constructed
cases, with BM25 alone and fused with the dense encoder."""

from __future__ import annotations

import pytest

from service import retrieval
from service.documents import Document, Part, read
from service.retrieval import passages, rank


def test_passages_follow_parts_and_paragraphs_and_point_back_into_the_text():
    """A short part is one passage; a long one is cut at paragraph breaks, a long paragraph at sentence
    ends; every passage is its part's text between its offsets."""
    long = "\n\n".join(
        " ".join(f"Paragraph {p} sentence {s} says something plain." for s in range(12)) for p in range(4)
    )
    doc = Document("notes.txt", "txt", [Part("start", "A short opening."), Part("section Body", long)])
    found = passages([doc], words=50)  # paragraphs of 84 words: cut at sentence ends
    assert found[0].text == "A short opening." and found[0].part == "start"
    body = [p for p in found if p.part == "section Body"]
    assert len(body) >= 7 and all(len(p.text.split()) <= 50 for p in body)
    assert all(doc.parts[1].text[p.start : p.end] == p.text for p in body)
    assert "".join(p.text for p in body).replace(" ", "").replace("\n", "") == long.replace(" ", "").replace("\n", "")


@pytest.mark.parametrize("dense", [False, True], ids=["bm25", "fused"])
def test_the_passage_holding_the_answer_ranks_first(office, monkeypatch, dense):
    """A fact on slide 3 among four slides, a number on sheet Q2 beside sheet Q1, a treaty on page 2."""
    if not dense:
        monkeypatch.setattr(retrieval, "encoder", lambda: None)
    elif retrieval.encoder() is None:
        pytest.skip("the dense extra is not installed")
    deck, book, paper = (
        read(office["pptx"], "deck.pptx"),
        read(office["xlsx"], "sales.xlsx"),
        read(office["pdf"], "p.pdf"),
    )
    every = passages([deck, book, paper])
    assert rank("What is the code word?", every, 1)[0].part == "slide 3"
    assert rank("How much did the south region sell?", every, 1)[0].part == "sheet Q2"
    assert rank("When was the treaty signed?", every, 1)[0].part == "page 2"
    assert len(rank("anything", every[:2], 3)) == 2  # fewer than k: all of them, in order


def test_passages_without_an_indexable_word_keep_their_order(monkeypatch):
    """Found by the fuzzer: passages of single letters and stopwords left BM25 an empty vocabulary, and
    ranking them raised (a 500 on an upload to /v1/answer)."""
    monkeypatch.setattr(retrieval, "encoder", lambda: None)
    found = passages([Document("x.txt", "txt", [Part("a", "a b"), Part("b", "c d"), Part("c", "of the")])])
    assert [p.part for p in rank("what is it", found, 2)] == ["a", "b"]
