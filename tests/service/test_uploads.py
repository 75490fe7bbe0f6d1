"""Uploads over HTTP (multipart on `/v1/summarize` and `/v1/answer`): real multipart requests against the
app on tiny-random; each bad-input case gets its documented status, an answer cites a file and part, and
the JSON bodies of the same paths work as before."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service import documents
from service.server.app import build_app


@pytest.fixture(scope="module")
def client(tiny, own_engine):
    with TestClient(build_app(own_engine(tiny))) as c:
        yield c


def test_a_deck_is_summarized(client, office):
    """A .pptx upload with form fields as the JSON route's: a summary, its token usage, and each sentence's
    slide where one shares its words."""
    r = client.post(
        "/v1/summarize",
        files=[("files", ("deck.pptx", office["pptx"], "application/octet-stream"))],
        data={"length": "short", "max_words": "20"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["summary"], str) and body["usage"]["prompt_tokens"] > 0
    assert all(c["part"] is None or c["part"].startswith("slide ") for c in body["citations"])


def test_an_answer_cites_the_file_and_part_it_drew_on(client, office):
    """Several files: the best passages for the question are answered from, and the citation names the
    file, part and characters of the one `passage_index` points at."""
    r = client.post(
        "/v1/answer",
        files=[("files", ("plan.docx", office["docx"], "")), ("files", ("sales.xlsx", office["xlsx"], ""))],
        data={"question": "How much did the south region sell?", "max_tokens": "24"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    if body["passage_index"] is None:  # tiny-random may draw on none
        assert body["citation"] is None
        return
    cited = body["citation"]
    doc = documents.read(office["docx" if cited["file"] == "plan.docx" else "xlsx"], cited["file"])
    part = next(p for p in doc.parts if p.label == cited["part"])
    assert part.text[cited["start"] : cited["end"]] == cited["passage"]


def test_streamed_summary_of_an_upload(client):
    """`stream` as a form field: server-sent events, ending with [DONE]."""
    with client.stream(
        "POST",
        "/v1/summarize",
        files=[("files", ("a.txt", b"The dam opened in 1936. " * 5, ""))],
        data={"stream": "true", "max_words": "10"},
    ) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert "data: [DONE]" in text


def test_bad_uploads_get_their_status(client, monkeypatch):
    """415 unsupported (naming the types read), 422 corrupt, 413 over the per-file cap, 400 for no file or
    too many; the server answers afterwards."""

    def post(*files, **data):
        return client.post("/v1/summarize", files=[("files", f) for f in files], data=data)

    r = post(("tool.exe", b"MZ\x90\x00binary", ""))
    assert r.status_code == 415 and ".docx" in r.json()["error"]["message"]
    r = post(("broken.docx", b"PK\x03\x04 not a zip", ""))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unreadable_file"
    r = client.post("/v1/summarize", files=[("length", (None, "short"))])  # multipart, no files
    assert r.status_code == 400 and r.json()["error"]["param"] == "files", r.text
    r = post(("a.txt", b"words here", ""), evaluate="rouge")  # a JSON body's field the form does not take
    assert r.status_code == 400, r.text
    assert post(*[(f"{i}.txt", b"words here", "") for i in range(9)]).status_code == 400
    monkeypatch.setattr(documents, "MAX_BYTES", 50)
    r = post(("big.txt", b"x" * 51, ""))
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    monkeypatch.undo()
    assert post(("ok.txt", b"The bridge opened in May. " * 3, "")).status_code == 200


def test_openapi_documents_the_uploads(client):
    """Both routes take multipart in the spec and declare 413, 415 and 422 (the route's own 422 survives
    the removal of FastAPI's validation 422)."""
    spec = client.get("/openapi.json").json()
    for path in ("/v1/summarize", "/v1/answer"):
        op = spec["paths"][path]["post"]
        assert "multipart/form-data" in op["requestBody"]["content"]
        assert {"413", "415", "422"} <= set(op["responses"])
