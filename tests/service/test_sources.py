"""Task outputs as data (`format: "json"`): an answer's supporting span as character offsets into its
passage, and each summary sentence with the document sentence it draws on; the offsets always cut out the
text they name."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.server.app import build_app
from service.tasks.sources import sentence_sources, sentence_spans, supporting_span

PASSAGE = "The band formed in 1998. Jason Mraz and Tristan Prettyman got engaged on Christmas Eve. Nobody knew."


def test_sentence_spans_cut_out_each_sentence():
    """Offsets of each sentence, found back in the text (line breaks and repeated sentences included)."""
    text = "First one. Second one!\nThird? First one."
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == ["First one.", "Second one!", "Third?", "First one."]
    assert spans[-1][0] > spans[0][0]


def test_the_supporting_sentence_is_the_one_sharing_the_answers_new_words():
    """The span is the passage sentence holding the answer's content words beyond the question's; none when
    no sentence holds one."""
    a, b = supporting_span("Jason Mraz got engaged to Tristan Prettyman.", "Who is Jason Mraz engaged to?", PASSAGE)
    assert PASSAGE[a:b] == "Jason Mraz and Tristan Prettyman got engaged on Christmas Eve."
    assert supporting_span("Paris is lovely.", "Who?", PASSAGE) is None


def test_summary_sentences_point_at_their_sources_across_documents():
    """Each summary sentence gets the document and characters it shares the most content words with (at least
    two), or no source."""
    docs = ["The council approved the new park on Monday.", "Construction of the park starts in May next year."]
    out = sentence_sources("The council approved a park. Construction starts next year. Birds sing.", docs)
    assert [s["source"] and s["source"]["document"] for s in out] == [0, 1, None]
    for s in out[:2]:
        src = s["source"]
        assert docs[src["document"]][src["start"] : src["end"]] == src["text"]


def test_the_endpoints_add_the_data_only_when_asked(tiny):
    """`format: "json"` adds `span` (answer, when a passage supports it) and `sentences` (summary); the text
    format keeps the responses as they were."""
    with TestClient(build_app(tiny)) as c:
        body = {"question": "Who got engaged?", "passages": [PASSAGE], "max_tokens": 8}
        plain = c.post("/v1/answer", json=body).json()
        assert plain["span"] is None
        data = c.post("/v1/answer", json=body | {"format": "json"}).json()
        assert data["answer"] == plain["answer"]
        if data["span"] is not None:
            assert PASSAGE[data["span"]["start"] : data["span"]["end"]] == data["span"]["text"]
        doc = "The council approved the new park on Monday. Construction starts in May."
        s = c.post("/v1/summarize", json={"document": doc, "length": "short", "format": "json"}).json()
        assert [x["text"] for x in s["sentences"]] and c.post("/v1/summarize", json={"document": doc}).json()[
            "sentences"
        ] is None
        assert c.post("/v1/answer", json=body | {"format": "yaml"}).status_code == 400
