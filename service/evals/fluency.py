"""Grammaticality hooks beyond the full-sentence check.

`fluency`, with the served model itself: the mean log-probability of the output's tokens (each given
the ones before it, the first given the end-of-text token) and SLOR (Lau et al. 2017): the output's
log-probability minus its unigram log-probability, per word, so that rare words are not held against
it. Unigram frequencies are `wordfreq`'s English list (a word it does not know counts as 1e-8).

`grammar`: CMU Link Grammar (Debian: `apt install python3-link-grammar`), the share of sentences it
parses with no unlinked word. Debian installs it for the system Python; when our interpreter is the
same version it is loaded from there. Without it the metric is refused with that note.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import math
import os
import re
import sys
import threading
from pathlib import Path

from service.errors import InvalidRequest
from service.tasks.sentences import sentences

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+")
DEBIAN_LINKGRAMMAR = "/usr/lib/python3/dist-packages/linkgrammar"
UNKNOWN_WORD = 1e-8


def fluency(prediction: str, references: list[str] = (), source: str | None = None, gen=None) -> dict:
    from wordfreq import word_frequency

    if gen is None:
        raise InvalidRequest("fluency needs the model")
    ids = gen.tokenizer.encode(prediction.strip())
    words = _WORD.findall(prediction)
    if not ids or not words:
        return {"lm_logprob": 0.0, "slor": 0.0}
    start = gen.tokenizer.hf.eos_token_id if gen.tokenizer.hf.eos_token_id is not None else ids[0]
    scored = gen.prompt_logprobs([start, *ids])[1:]
    total = sum(s.logprob for s in scored)
    unigram = sum(math.log(max(word_frequency(w, "en"), UNKNOWN_WORD)) for w in words)
    return {"lm_logprob": total / len(ids), "slor": (total - unigram) / len(words)}


_LOCK = threading.Lock()  # loading, and parsing (one English dictionary shared by every thread)


def _linkgrammar():
    with _LOCK:
        return _load_linkgrammar()


@functools.cache
def _load_linkgrammar():
    """(module, English dictionary), or None when Link Grammar is not installed."""
    try:
        import linkgrammar
    except ImportError:
        path = Path(os.environ.get("NLG_LINKGRAMMAR", DEBIAN_LINKGRAMMAR))
        tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
        if not any(path.glob(f"_clinkgrammar.{tag}*.so")):
            return None
        sys.path.append(str(path))  # what Debian's linkgrammar.pth does: its modules import each other flat
        spec = importlib.util.spec_from_file_location("linkgrammar", path / "__init__.py")
        linkgrammar = importlib.util.module_from_spec(spec)
        sys.modules["linkgrammar"] = linkgrammar
        spec.loader.exec_module(linkgrammar)
    atexit.register(_load_linkgrammar.cache_clear)  # free the dictionary while its module still exists
    return linkgrammar, linkgrammar.Dictionary("en")


def grammar_unavailable() -> str | None:
    if _linkgrammar() is None:
        return (
            "metric 'grammar' needs CMU Link Grammar, which is not installed (Debian: apt install python3-link-grammar)"
        )
    return None


def grammar(prediction: str, references: list[str] = (), source: str | None = None, gen=None) -> dict:
    lg, english = _linkgrammar()
    options = lg.ParseOptions(min_null_count=0, max_null_count=0, max_parse_time=5)
    found = [s for s in sentences(prediction) if _WORD.search(s)]
    with _LOCK:
        parsed = sum(any(True for _ in lg.Sentence(s, english, options).parse()) for s in found)
    return {"grammar": parsed / len(found) if found else 0.0}
