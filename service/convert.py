"""Documents read in a child process with a memory limit and a deadline, so that no file a client sends
can take the server's memory or time: a .docx that expands to gigabytes of XML, a workbook of a million
shared strings, a 400-page PDF.

`convert(data, name, timeout)` runs `service.documents.read` in a process forked from a server process
that has imported the converters once (multiprocessing's forkserver: a fork takes milliseconds and
shares nothing with the server's threads), its address space capped at `MEMORY_LIMIT`. It returns the
`Document`, or raises `FileTooLarge` (413: the child ran out of its memory, or the text passed
`MAX_CHARS`), `DeadlineExceeded` (504: `timeout` passed), `Unreadable` (422: the child died otherwise) or
the reader's own errors (415/422/413). `stop`, when set, kills the child at once and raises `ClientGone`.
The text is bounded in the child, before anything tokenizes it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import signal
import threading
import time
from multiprocessing.connection import Connection

import psutil

from service import documents
from service.documents import Document
from service.errors import ClientGone, DeadlineExceeded, FileTooLarge, InvalidRequest, Unreadable, UnsupportedMedia

MEMORY_LIMIT = 2 << 30  # the child's address space, the converters' imports included (about 0.5 GB of it)
MAX_CHILDREN = 2  # files read at once; the others wait their turn (within their own deadline)
MAX_CHARS = 1_000_000  # the text of one file, in characters (about 250,000 tokens)
TIMEOUT_S = 300.0  # a file's reading time where no request deadline bounds it (batch jobs' folders)
POLL_S = 0.1  # how often the parent looks at `stop` while the child works
REFUSALS = (UnsupportedMedia, Unreadable, FileTooLarge)  # the reader's errors, raised again in the parent

_context: multiprocessing.context.ForkServerContext | None = None
_start = threading.Lock()
_children = threading.BoundedSemaphore(MAX_CHILDREN)


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    with _start:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["service.documents", "markitdown"])
            _context = context
    return _context


def _run(data: bytes, name: str, label: str, deadline: float, timeout: float, stop) -> tuple[str, object]:
    """(kind, value) as the child sent them; raises past `deadline` (monotonic), on `stop`, or when the
    child died."""
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, data, name, MEMORY_LIMIT, MAX_CHARS), daemon=True)
    child.start()
    send.close()
    peak = 0  # the child's address space, as last seen: a native abort near the limit is a memory failure
    try:
        while not receive.poll(POLL_S):
            if stop is not None and stop.is_set():
                raise ClientGone(f"reading {label} was stopped: the client left")
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"reading {label} took longer than {timeout:.1f} s")
            with contextlib.suppress(psutil.Error):
                peak = max(peak, psutil.Process(child.pid).memory_info().vms)
        try:
            return receive.recv()
        except EOFError:  # the child died without a word: a native abort (an allocation that failed), a kill
            child.join()
            if peak > 0.75 * MEMORY_LIMIT or child.exitcode == -signal.SIGKILL:
                return "memory", None
            raise Unreadable(f"reading {label} failed: the converter crashed (exit code {child.exitcode})") from None
    finally:
        child.kill()
        child.join()
        receive.close()


def _child(out: Connection, data: bytes, name: str, memory: int, max_chars: int) -> None:
    """In the child (a fork of the forkserver, whose module globals are its own: the limits come as
    arguments)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        doc = documents.read(data, name)
        chars = sum(len(p.text) for p in doc.parts)
        if chars > max_chars:
            raise FileTooLarge(f"{doc.name} holds {chars} characters of text; the limit is {max_chars} per file")
        out.send(("ok", doc))
    except InvalidRequest as e:
        out.send(("refused", (type(e).__name__, str(e))))
    except MemoryError:
        out.send(("memory", None))
    except BaseException as e:  # a converter's own bug: this file's failure, never the server's
        out.send(("failed", f"{type(e).__name__}: {e}"[:400]))


def convert(data: bytes, name: str, timeout: float, stop: threading.Event | None = None) -> Document:
    """`documents.read(data, name)` in a child process bounded in memory and time (see the module)."""
    label = documents.label(name)
    if len(data) > documents.MAX_BYTES:  # refused before a child is started (and the bytes copied)
        return documents.read(data, name)
    deadline = time.monotonic() + timeout
    if not _children.acquire(timeout=max(timeout, 0.0)):
        raise DeadlineExceeded(f"reading {label} did not start within {timeout:.1f} s: other files were being read")
    try:
        kind, value = _run(data, name, label, deadline, timeout, stop)
    finally:
        _children.release()
    if kind == "ok":
        return value
    if kind == "memory":
        raise FileTooLarge(f"reading {label} needed more than {MEMORY_LIMIT >> 20} MiB of memory")
    if kind == "refused":
        cls = {c.__name__: c for c in REFUSALS}.get(value[0], InvalidRequest)
        raise cls(value[1])
    raise Unreadable(f"reading {label} failed: {value}")
