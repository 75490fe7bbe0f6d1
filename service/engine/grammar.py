"""Structured outputs: a request's JSON schema, regular expression, choice or grammar as the set of tokens
allowed at each step, through llguidance (MIT; native, no Python dependencies, a token mask in tens of
microseconds on a CPU).

`Grammars` belongs to one tokenizer. `compile(kind, spec)` turns what a request asks into llguidance's
grammar text and checks it against the tokenizer, within llguidance's own work limits, on the caller's
thread (the HTTP side runs it on a worker thread, never on the event loop or the engine thread): a schema
or grammar it cannot take is `InvalidRequest` (400) naming what is wrong. Checked grammars are kept (the
last `CACHED`), each as a matcher that new sequences copy (`matcher`). On the engine thread the sampler
asks each constrained row's matcher for its mask (`allowed`), applies it with the other processors, and
gives the matcher the token picked (`Sampler.pick`). A sequence's end token is allowed exactly when its
grammar is complete, so a constrained answer ends where its grammar does.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import torch

from model.tokenizer import END_TOKENS, Tokenizer
from service.errors import InvalidRequest

CACHED = 256  # grammars kept, checked, each with a matcher to copy
KINDS = ("json_schema", "regex", "choice", "grammar")
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # as json.dumps writes:
# no run of whitespace for a small model to loop in (the empty schema `{}` would allow one)


def grammar_text(kind: str, spec: Any) -> str:
    """llguidance's grammar for a request's `json_schema` (a dict), `regex`, `choice` (a list of strings) or
    `grammar` (Lark, or llama.cpp's GBNF); raises `InvalidRequest` for a spec of the wrong shape."""
    if kind == "json_schema":
        if not isinstance(spec, dict):
            raise InvalidRequest("a JSON schema must be an object", param="response_format")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_STYLE)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"invalid JSON schema: {e}", param="response_format") from None
    if kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise InvalidRequest("a regex must be a non-empty string", param="guided_regex")
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise InvalidRequest("a choice must be a non-empty list of non-empty strings", param="guided_choice")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
    if kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidRequest("a grammar must be a non-empty string", param="guided_grammar")
        try:
            return llguidance.grammar_from("grammar", spec)
        except ValueError as e:
            raise InvalidRequest(f"invalid grammar: {e}", param="guided_grammar") from None
    raise InvalidRequest(f"unknown structured output kind {kind!r}: one of {', '.join(KINDS)}")


class Grammars:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        """For `tokenizer`'s model, whose logits have `vocab_size` columns."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self.kept: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (made once, on first use), ending at the chat's end token."""
        with self.lock:
            if self._lltokenizer is None:
                hf = self.tokenizer.hf
                vocab = hf.get_vocab()
                end = next((vocab[t] for t in END_TOKENS if t in vocab), hf.eos_token_id)
                self._lltokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=end)
            return self._lltokenizer

    def compile(self, kind: str, spec: Any) -> str:
        """The checked grammar for a request (see `grammar_text`), kept for its sequences' matchers."""
        grammar = grammar_text(kind, spec)
        self.template(grammar)
        return grammar

    def template(self, grammar: str) -> llguidance.LLMatcher:
        """The kept matcher of `grammar`, made and checked when it is not kept."""
        with self.lock:
            if grammar in self.kept:
                self.kept.move_to_end(grammar)
                return self.kept[grammar]
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if failed:
            raise InvalidRequest(f"the structured output cannot be used: {messages[0]}", param="response_format")
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the structured output cannot be used: {matcher.get_error()}")
        with self.lock:
            self.kept[grammar] = matcher
            while len(self.kept) > CACHED:
                self.kept.popitem(last=False)
        return matcher

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence."""
        return self.template(grammar).deep_copy()


def allowed(matchers: list[llguidance.LLMatcher], vocab: int) -> torch.Tensor:
    """(len(matchers), vocab) bool on the CPU: the tokens each matcher allows next. (llguidance.torch would
    do the fill, but importing it compiles a kernel with torch.compile: 115 MB of Inductor in every
    process.)"""
    bits = torch.zeros(len(matchers), (vocab + 31) // 32, dtype=torch.int32)
    for r, m in enumerate(matchers):
        row = bits[r]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).bool().view(len(matchers), -1)[:, :vocab]
