"""Documents as text in parts (`service.documents`): fixtures written in the tests (the `office` fixture:
python-docx, python-pptx, openpyxl, fpdf2; `email` here), never downloaded. Each format keeps its text
and its structure (a fact on slide 3, sheet Q2 or page 2 is labelled there), and every kind of bad
input gets its own error."""

from __future__ import annotations

import io
import json
import zipfile
from email.message import EmailMessage

import pytest

from service import documents
from service.cli.parser import main
from service.documents import read
from service.errors import FileTooLarge, Unreadable, UnsupportedMedia


def test_office_and_pdf_keep_their_text_and_parts(office):
    """Guards the part labels citations will use: sections of a Word file, slides, sheets (header row
    kept) and pages."""
    word = read(office["docx"], "plan.docx")
    assert [p.label for p in word.parts] == ["section Launch", "section Budget"]
    assert "4 million euros" in word.parts[1].text
    deck = read(office["pptx"], "deck.pptx")
    assert [p.label for p in deck.parts] == ["slide 1", "slide 2", "slide 3", "slide 4"]
    assert "walrus" in deck.parts[2].text and "[slide 3]" in deck.text()
    book = read(office["xlsx"], "sales.xlsx")
    assert [p.label for p in book.parts] == ["sheet Q1", "sheet Q2"]
    assert "region" in book.parts[1].text and "4242" in book.parts[1].text
    paper = read(office["pdf"], "paper.pdf")
    assert [p.label for p in paper.parts] == ["page 1", "page 2"] and "1648" in paper.parts[1].text


def test_type_comes_from_the_content_when_the_name_does_not_say(office):
    """An upload named without (or with an unknown) extension is read by its bytes."""
    assert read(office["pdf"], "upload").kind == "pdf"
    assert read(office["pptx"], "upload.bin").kind == "pptx"
    assert read(b"<!DOCTYPE html><html><body><h1>Hi</h1><p>Plain words.</p></body></html>", "page").kind == "html"
    assert read("Grüße aus Köln.".encode(), "note").parts[0].text == "Grüße aus Köln."


def test_email_keeps_who_said_what_and_reads_its_attachments(office):
    """Headers kept, the text part preferred over the HTML one, attachments converted and labelled;
    an HTML-only message is read as text."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Ann <ann@example.com>", "Bob <bob@example.com>", "Budget"
    msg.set_content("Bob, the budget is final.")
    msg.add_alternative("<p>HTML <b>version</b></p>", subtype="html")
    msg.add_attachment(office["docx"], maintype="application", subtype="octet-stream", filename="../plan.docx")
    mail = read(bytes(msg), "thread.eml")
    assert mail.parts[0].label == "message from Ann"
    assert "From: Ann <ann@example.com>" in mail.parts[0].text and "the budget is final" in mail.parts[0].text
    assert "HTML" not in mail.parts[0].text
    assert [p.label for p in mail.parts[1:]] == [
        "attachment plan.docx, section Launch",
        "attachment plan.docx, section Budget",
    ]
    html_only = EmailMessage()
    html_only["From"], html_only["Subject"] = "Cy <cy@example.com>", "News"
    html_only.set_content("<p>The <b>vote</b> passed.</p>", subtype="html")
    text = read(bytes(html_only), "news.eml").parts[0].text
    assert "The **vote** passed." in text or "The vote passed." in text


def test_a_thread_is_split_into_its_messages_by_sender():
    """Quoted replies ("On <date>, <name> wrote:" with > marks, Outlook's "From: / Sent:" block) become
    one part per earlier message, labelled with who wrote it, quote marks taken off."""
    msg = EmailMessage()
    msg["From"], msg["Subject"] = "Alice Wong <alice@example.com>", "Re: launch"
    msg.set_content(
        "Thanks Bob, Friday works. The budget is 40,000 euros.\n\nAlice\n\n"
        "On Tue, 3 Mar 2026 at 10:02, Bob Smith <bob@example.com> wrote:\n"
        "> Can we move the launch to Friday?\n> The printer is late.\n>\n"
        "> On Mon, 2 Mar 2026, Carol <carol@example.com> wrote:\n> > The launch is on Wednesday.\n"
    )
    mail = read(bytes(msg), "thread.eml")
    assert [p.label for p in mail.parts] == [
        "message from Alice Wong",
        "earlier message from Bob Smith",
        "earlier message from Carol",
    ]
    assert "40,000 euros" in mail.parts[0].text and "Friday?" not in mail.parts[0].text
    assert mail.parts[1].text == "Can we move the launch to Friday?\nThe printer is late."
    assert mail.parts[2].text == "The launch is on Wednesday."
    outlook = EmailMessage()
    outlook["From"] = "ed@example.com"
    outlook.set_content(
        "Sounds good.\n\n-----Original Message-----\nFrom: Dan Brown <dan@example.com>\n"
        "Sent: Monday, March 2, 2026 9:00 AM\nSubject: plan\n\nThe plan is approved.\n"
    )
    parts = read(bytes(outlook), "reply.eml").parts
    assert [(p.label, p.text.splitlines()[-1]) for p in parts] == [
        ("message from ed@example.com", "Sounds good."),
        ("earlier message from Dan Brown", "The plan is approved."),
    ]


def test_bad_files_get_their_own_errors(office, monkeypatch):
    """415 names the supported types; 422 says what failed; 413 for a file over the cap or a zip that
    would expand past its limit (nothing is unpacked); names never act as paths."""
    with pytest.raises(UnsupportedMedia, match=r"\.docx"):
        read(b"MZ\x90\x00\x03binary", "tool.exe")
    with pytest.raises(Unreadable, match="corrupt"):
        read(b"PK\x03\x04 not really a zip", "broken.docx")
    with pytest.raises(Unreadable, match="encrypted"):
        read(b"%PDF-1.4\n1 0 obj << /Encrypt 2 0 R >> endobj\n", "secret.pdf")
    with pytest.raises(Unreadable, match="no text"):
        read(b"   \n", "empty.txt")
    with pytest.raises(Unreadable, match="UTF-8"):
        read(b"\xff\xfe\xfa", "latin.txt")
    with pytest.raises(Unreadable, match="e-mail"):  # the email package raised LookupError, then IndexError
        read(b'From: a\nContent-Type: text/plain; charset="bogus"\n\nhello', "charset.eml")
    with pytest.raises(Unreadable, match="e-mail"):
        read(b'From: <<@@>>,,;;"\nTo: "\n\nbody', "headers.eml")
    monkeypatch.setattr(documents, "MAX_EXPANDED", 1000)
    with pytest.raises(FileTooLarge, match="expands"):
        read(office["docx"], "bomb.docx")
    monkeypatch.setattr(documents, "MAX_BYTES", 100)
    with pytest.raises(FileTooLarge, match="limit"):
        read(b"x" * 101, "big.txt")
    assert read(b"hello", "../../etc/notes.txt").name == "notes.txt"


def test_running_out_of_memory_inside_a_converter_is_said_as_such(office, monkeypatch):
    """markitdown's .docx converter rewrites the zip; a MemoryError in that write made the close fail too
    (ValueError: I/O operation on closed file), and the file got a 422 instead of the 413 it is owed."""

    def full(self, data):  # what the close did after the write ran out
        try:
            raise MemoryError
        except MemoryError:
            raise ValueError("I/O operation on closed file.") from None

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", full)
    with pytest.raises(MemoryError, match="ran out of memory"):
        read(office["docx"], "wide.docx")


def test_an_encrypted_office_file_is_refused():
    """A zip member flagged encrypted (password-protected Office files) is 422, not a crash."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("word/document.xml", "<x/>")
    data = bytearray(out.getvalue())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # set the encryption bit in every header
        at = data.find(sig)
        while at >= 0:
            flags = at + (6 if sig == b"PK\x03\x04" else 8)
            data[flags] |= 1
            at = data.find(sig, at + 4)
    with pytest.raises(Unreadable, match="encrypted"):
        read(bytes(data), "locked.docx")


def test_cli_summarizes_a_deck(office, capsys, tmp_path):
    """`nlg summarize deck.pptx` reads the deck (its slides labelled) and summarizes it; an unsupported
    file is one error line naming the supported types."""
    path = tmp_path / "deck.pptx"
    path.write_bytes(office["pptx"])
    assert main(["summarize", str(path), "--model", "tiny-random", "--json", "--length", "short"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] > 0 and isinstance(out["summary"], str)
    tool = tmp_path / "tool.exe"
    tool.write_bytes(b"MZ\x90\x00binary")
    assert main(["summarize", str(tool), "--model", "tiny-random"]) == 2
    assert "supported types are" in capsys.readouterr().err


def test_cli_answers_from_files_with_a_citation(office, capsys, tmp_path):
    """`nlg answer Q --file deck.pptx --file sales.xlsx`: the best passages of both files are answered
    from; a citation, when the answer drew on one, points into the file's part."""
    deck, book = tmp_path / "deck.pptx", tmp_path / "sales.xlsx"
    deck.write_bytes(office["pptx"])
    book.write_bytes(office["xlsx"])
    args = ["answer", "What is the code word?", "--file", str(deck), "--file", str(book), "--model", "tiny-random"]
    assert main([*args, "--json", "--max-tokens", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] > 0
    if "citation" in out:
        assert out["citation"]["file"] in ("deck.pptx", "sales.xlsx")


def test_batch_summarizes_a_folder_and_resumes(office, tiny, tmp_path):
    """`nlg batch summarize DIR`: one result per document keyed by its file name, an unreadable one in the
    errors file; a rerun with a new file does only that one."""
    from service.jobs.files import run_job

    docs = tmp_path / "docs"
    (docs / "mail").mkdir(parents=True)
    (docs / "deck.pptx").write_bytes(office["pptx"])
    (docs / "mail" / "note.txt").write_text("The meeting moved to Friday at noon. " * 3)
    (docs / "tool.exe").write_bytes(b"MZ\x90\x00binary")
    out = tmp_path / "out.jsonl"
    first = run_job(tiny, "summarize", docs, out, workers=2)
    assert (first.succeeded, first.failed) == (2, 1)
    assert sorted(json.loads(line)["file"] for line in out.read_text().splitlines()) == ["deck.pptx", "mail/note.txt"]
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert errors[0]["file"] == "tool.exe" and "supported types" in errors[0]["error"]
    (docs / "plan.docx").write_bytes(office["docx"])
    again = run_job(tiny, "summarize", str(docs / "*.docx"), out, workers=2)  # a glob: only the new file
    assert (again.total, again.succeeded) == (1, 1)
    rerun = run_job(tiny, "summarize", docs, out, workers=2)
    assert (rerun.skipped, rerun.succeeded) == (4, 0)


def test_a_long_workbook_is_summarized_in_groups_of_parts_with_header_rows(tiny, monkeypatch):
    """Past the context, whole parts are grouped under their labels; a sheet cut in pieces keeps its
    header row in each; the summary's sentences cite the parts they share words with."""
    from service.tasks.document_summary import _groups, cite, document_plan
    from service.tasks.plans import run_plan

    rows = "\n".join(f"| region {i} | {i * 7} |" for i in range(300))
    sheet = f"| region | sales |\n| --- | --- |\n{rows}"
    pieces = _groups(
        tiny, [("b.xlsx, sheet Q1", "| a | b |\n| --- | --- |\n| x | 1 |"), ("b.xlsx, sheet Q2", sheet)], 400
    )
    assert pieces[0] == "[b.xlsx, sheet Q1]\n| a | b |\n| --- | --- |\n| x | 1 |"
    assert len(pieces) > 2 and all(
        p.startswith("[b.xlsx, sheet Q2]\n| region | sales |\n| --- | --- |\n") for p in pieces[1:]
    )
    assert all(len(tiny.tokenizer.encode(p)) <= 400 for p in pieces)
    doc = documents.Document(
        "b.xlsx", "xlsx", [documents.Part("sheet Q1", "| a | b |"), documents.Part("sheet Q2", sheet)]
    )
    monkeypatch.setattr(tiny.engine.limits, "context", 700)
    s = run_plan(tiny, document_plan(tiny, [doc], "short"))
    assert s.prompt_tokens > len(tiny.tokenizer.encode(doc.text()))  # every piece was read, then the summaries
    parts = [
        ("deck.pptx", "slide 2", "Revenue grew in the north region."),
        ("deck.pptx", "slide 3", "The code word is walrus."),
    ]
    cited = cite("The code word was walrus. Nothing else.", parts)
    assert [(c["file"], c["part"]) for c in cited] == [("deck.pptx", "slide 3"), (None, None)]


def test_a_document_that_fits_reaches_the_model_whole(tiny):
    """A deck within the context is summarized from every slide, labels included; the same text given as
    plain text is cut to its key sentences (which, for a real deck, kept slide 1 and left out the rest,
    and for a workbook dropped the header row that says what a column is)."""
    from service.tasks.document_summary import document_plan
    from service.tasks.plans import run_plan
    from service.tasks.summarize import summarize

    slides = [documents.Part(f"slide {i}", f"Slide {i} says the launch moves to week {i}.") for i in range(1, 9)]
    doc = documents.Document("deck.pptx", "pptx", slides)
    whole = run_plan(tiny, document_plan(tiny, [doc], "short"))
    assert whole.prompt_tokens > len(tiny.tokenizer.encode(doc.text()))
    assert summarize(tiny, doc.text(), "short").prompt_tokens < len(tiny.tokenizer.encode(doc.text()))
