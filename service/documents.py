"""The documents people have, as text in parts: e-mail, Word, PowerPoint, Excel, PDF, HTML and plain text.

`read(data, name)` returns a `Document`: its parts in order, each with a label saying where it sits
(`slide 3`, `sheet Q2`, `page 2`, `section Budget`, `message from Ann`, `attachment notes.docx`), so that a
summary or an answer can say where a fact came from. Conversion is markitdown's (the `documents`
extra: .docx, .pptx, .xlsx, .pdf, .html, .msg, .epub, .csv, .json), the standard library's `email`
for .eml (From/To/Cc/Subject/Date kept, the text part preferred over the HTML one, a thread's quoted
replies split into one part per message and sender by `mail-parser-reply`, attachments read too), and
plain .txt/.md. No macro or script runs: markitdown reads the files' XML and text, never
executes them.

Bad input raises `service.errors`' `UnsupportedMedia` (415: names the supported types), `Unreadable`
(422: corrupt, encrypted, or nothing to read) or `FileTooLarge` (413: `MAX_BYTES` per file, and a zip
container, as every Office file is, may not expand past `MAX_EXPANDED`: no zip bomb is unpacked).
File names are used for their extension and as labels, never as paths.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePath

from service.errors import FileTooLarge, InvalidRequest, Unreadable, UnsupportedMedia

MAX_BYTES = 20 << 20  # one file
MAX_EXPANDED = 200 << 20  # what a zip container's members may expand to, in all
MAX_ATTACHMENTS = 20  # an e-mail's attachments read, at most (the rest are listed by name)
MARKITDOWN = {".docx", ".pptx", ".xlsx", ".pdf", ".html", ".htm", ".msg", ".epub", ".csv", ".json"}
PLAIN = {".txt", ".md", ".markdown", ".text"}
SUPPORTED = sorted(MARKITDOWN | PLAIN | {".eml"})
WROTE = "wrote|schrieb|a écrit|escribió|ha scritto|schreef"  # a reply's header, in the languages `_thread` reads
LABELLED = {"pptx", "xlsx", "pdf", "eml"}  # kinds whose parts are slides, sheets, pages, messages


@dataclass
class Part:
    label: str  # where it sits in the document: "slide 3", "sheet Q2", "page 2", "section Budget", ...
    text: str


@dataclass
class Document:
    name: str
    kind: str  # the extension it was read as, without the dot
    parts: list[Part] = field(default_factory=list)

    def text(self) -> str:
        """The parts in order; those of a deck, workbook, PDF or e-mail each under its label ("[slide 3]"),
        those of a text (its sections, headings included) as they are."""
        if self.kind in LABELLED:
            return "\n\n".join(f"[{p.label}]\n{p.text}" for p in self.parts)
        return "\n\n".join(p.text for p in self.parts)


def kind_of(data: bytes, name: str) -> str:
    """The extension to read `data` as: the name's, else one told by the content (a PDF, an Office zip,
    an e-mail, HTML, UTF-8 text); raises `UnsupportedMedia`."""
    ext = PurePath(name or "").suffix.lower()
    if ext in SUPPORTED:
        return ext
    if data.startswith(b"%PDF-"):
        return ".pdf"
    if data.startswith(b"PK\x03\x04"):
        return _office_kind(data) or _unsupported(name)
    head = data[:2048].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return ".html"
    if re.match(rb"(?:[\w-]+:[^\n]*\r?\n)+", head) and re.search(rb"^(from|subject|to):", head, re.M):
        return ".eml"
    if not ext:
        try:
            data.decode("utf-8")
            return ".txt"
        except UnicodeDecodeError:
            pass
    return _unsupported(name)


def _unsupported(name: str):
    raise UnsupportedMedia(f"cannot read {name or 'this file'}: supported types are {', '.join(SUPPORTED)}")


def _office_kind(data: bytes) -> str | None:
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except Exception:  # not a zip zipfile can read (BadZipFile, EOFError, ValueError, ...)
        return None
    for prefix, ext in (("word/", ".docx"), ("ppt/", ".pptx"), ("xl/", ".xlsx")):
        if any(n.startswith(prefix) for n in names):
            return ext
    return ".epub" if "META-INF/container.xml" in names else None


def label(name: str) -> str:
    """What a file is called in parts and messages: its name without any folder (never used as a path)."""
    return PurePath(name or "document").name


def read(data: bytes, name: str = "") -> Document:
    """`data` (the bytes of a file called `name`) as a `Document` (in this process: `service.convert` reads a
    client's file in a child bounded in memory and time)."""
    name = label(name)
    if len(data) > MAX_BYTES:
        raise FileTooLarge(f"{name} is {len(data)} bytes; the limit is {MAX_BYTES} per file")
    kind = kind_of(data, name)
    if kind in PLAIN:
        parts = _sections(_decode(data, name))
    elif kind == ".eml":
        try:
            parts = _email(data, name)
        except (InvalidRequest, MemoryError):
            raise
        except Exception as e:  # the email package's own failures: a malformed header, an unknown charset
            raise Unreadable(f"cannot read {name} as e-mail: {type(e).__name__}: {e}"[:400]) from None
    else:
        parts = _markitdown(data, name, kind)
    parts = [p for p in parts if p.text.strip()]
    if not parts:
        raise Unreadable(f"{name} holds no text to read")
    return Document(name, kind.lstrip("."), parts)


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Unreadable(f"{name} is not UTF-8 text") from None


def _markitdown(data: bytes, name: str, kind: str) -> list[Part]:
    try:
        from markitdown import MarkItDown
    except ImportError:
        raise UnsupportedMedia(
            f"reading {kind} files needs the documents extra: pip install -e '.[documents]'"
        ) from None
    if data.startswith(b"PK\x03\x04"):
        _check_zip(data, name)
    if kind == ".pdf" and b"/Encrypt" in data:
        raise Unreadable(f"{name} is an encrypted PDF: decrypt it first")
    try:
        text = MarkItDown(enable_plugins=False).convert_stream(io.BytesIO(data), file_extension=kind).markdown
    except Exception as e:  # every converter's own failure: a corrupt or encrypted file
        if _out_of_memory(e):
            raise MemoryError(f"reading {name} ran out of memory") from None
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise Unreadable(f"cannot read {name} as {kind}: {reason[:300]}") from None
    return _parts(text, kind)


def _out_of_memory(e: BaseException) -> bool:
    """Whether a MemoryError lies behind `e`: markitdown wraps each converter's failure (its `attempts`), and
    a converter may fail again while cleaning up after one (a zip closed mid-write: ValueError)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        if isinstance(x, MemoryError):
            return True
        seen.add(id(x))
        todo += [x.__cause__, x.__context__] + [a.exc_info[1] for a in getattr(x, "attempts", None) or []]
    return False


def _check_zip(data: bytes, name: str) -> None:
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except Exception:  # BadZipFile, EOFError, ValueError, ...
        raise Unreadable(f"{name} is not a valid Office file (a corrupt zip container)") from None
    if any(m.flag_bits & 0x1 for m in members):
        raise Unreadable(f"{name} is encrypted: save it without a password first")
    if sum(m.file_size for m in members) > MAX_EXPANDED:
        raise FileTooLarge(f"{name} expands past {MAX_EXPANDED} bytes")


def _parts(text: str, kind: str) -> list[Part]:
    """markitdown's text cut where the format's own parts start."""
    if kind == ".pptx":
        pieces = re.split(r"<!-- Slide number: (\d+) -->", text)
        return [Part(f"slide {n}", t.strip()) for n, t in zip(pieces[1::2], pieces[2::2])]
    if kind == ".xlsx":
        pieces = re.split(r"^## (.+)$", text, flags=re.M)
        return [Part(f"sheet {n.strip()}", t.strip()) for n, t in zip(pieces[1::2], pieces[2::2])]
    if kind == ".pdf":
        return [Part(f"page {i}", t.strip()) for i, t in enumerate(text.split("\f"), 1)]
    return _sections(text)


def _sections(text: str) -> list[Part]:
    """Markdown cut at its headings (a text without any is one part)."""
    pieces = re.split(r"^#{1,3} +(.+)$", text, flags=re.M)
    parts = [Part("start", pieces[0].strip())] if pieces[0].strip() else []
    parts += [Part(f"section {h.strip()}", f"{h.strip()}\n{t.strip()}") for h, t in zip(pieces[1::2], pieces[2::2])]
    return parts or [Part("text", text.strip())]


def _email(data: bytes, name: str) -> list[Part]:
    """The message (its headers, then its text part, or its HTML one as text), each earlier message it
    quotes as a part of its own labelled with its sender (a thread keeps who said what), and each
    attachment read as a document of its own type; an attachment that cannot be read is listed, not fatal."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    headers = "\n".join(f"{h}: {msg[h]}" for h in ("From", "To", "Cc", "Date", "Subject") if msg[h])
    body = msg.get_body(preferencelist=("plain", "html"))
    text = ""
    if body is not None:
        content = body.get_content()
        if body.get_content_type() == "text/html":
            content = "\n".join(p.text for p in _markitdown(content.encode(), name, ".html"))
        text = content.strip()
    addresses = msg["From"].addresses if msg["From"] else ()
    sender = addresses[0].display_name or addresses[0].addr_spec if addresses else ""
    (_, latest), *quoted = _thread(text)
    parts = [Part(f"message from {sender}" if sender else "message", f"{headers}\n\n{latest}".strip())]
    parts += [Part(f"earlier message from {who}" if who else "earlier message", t) for who, t in quoted]
    for i, attachment in enumerate(msg.iter_attachments()):
        file = PurePath(attachment.get_filename() or f"attachment-{i + 1}").name
        if i >= MAX_ATTACHMENTS:
            parts.append(Part(f"attachment {file}", "(not read: too many attachments)"))
            continue
        try:
            inner = read(attachment.get_payload(decode=True) or b"", file)
        except InvalidRequest as e:
            parts.append(Part(f"attachment {file}", f"(not read: {e})"))
            continue
        parts += [
            Part(f"attachment {file}, {p.label}" if len(inner.parts) > 1 else f"attachment {file}", p.text)
            for p in inner.parts
        ]
    return parts


def _thread(text: str) -> list[tuple[str, str]]:
    """A body's own text, then (sender, text) for each earlier message it quotes, newest first: the
    replies `mail-parser-reply` finds at "On <date>, <name> wrote:" and "From: / Sent:" headers, with
    their quote marks taken off. A body quoting nothing is itself alone."""
    from mailparser_reply import EmailReplyParser

    replies = EmailReplyParser(languages=["en", "de", "fr", "es", "it", "nl"]).read(text).replies
    if len(replies) < 2:
        return [("", text)]
    out = []
    for r in replies:
        body = re.sub(r"^(?:> ?)+", "", r.body, flags=re.M).strip()
        if body:
            out.append((_sender(re.sub(r"^(?:> ?)+", "", r.headers, flags=re.M)), body))
    return out or [("", text)]


def _sender(headers: str) -> str:
    """The name in a reply's header: "From: Bob <bob@x>" or "On <date>, Bob <bob@x> wrote:"; "" if none."""
    if m := re.search(r"^\s*\*?From:\*?\s*(.+)$", headers, flags=re.M | re.I):
        who = m.group(1)
    elif m := re.search(rf"([^,\n]+?)\s*(?:<[^>\n]*>)?\s*(?:{WROTE})\s*:", headers):
        who = m.group(1)
    else:
        return ""
    who = re.sub(r"<[^>]*>|\[mailto:[^\]]*\]|\"", "", who).strip()
    return who or re.sub(r"[<>]", "", m.group(1)).strip()
