"""Log-probabilities in OpenAI's two shapes, lined up with the text they come with.

Tokens are spelled from their bytes (`Tokenizer.token_bytes`): a token that holds part of a character is
`bytes:\\xNN...` in the completions API (as OpenAI writes it) and carries its `bytes` in the chat API, never
U+FFFD pieces whose lengths do not add up. `text_offset` counts characters of the returned text: a token
that starts inside a character points at that character. Only tokens that start inside the returned
text are listed: the tokens past a stop string, which the text leaves out, are left out here too.
"""

from __future__ import annotations

import codecs

from model.tokenizer import Tokenizer, spell
from service.engine.sequence import TokenLogprob


class Aligned:
    """The tokens of one choice that its text so far covers, token by token, for streams and whole
    responses alike: `take(ids, lps, text_bytes)` returns the tokens (not yet taken) that start before
    byte `text_bytes` of the text, each with its bytes and character offset."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.taken = 0  # tokens handed out
        self.at = 0  # bytes of those tokens
        self.chars = 0  # whole characters in those bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, ids: list[int], lps: list, text_bytes: int) -> list[tuple[int, bytes, int, TokenLogprob | None]]:
        """(id, bytes, character offset, log-probability) of each token from `ids[taken:]` that starts
        before `text_bytes` (`lps` runs beside `ids`; None where it has no entry)."""
        out = []
        todo = ids[self.taken :]
        for i, raw in zip(todo, self.tok.token_bytes(todo)):
            if self.at >= text_bytes:
                break
            out.append((i, raw, self.chars, lps[self.taken] if self.taken < len(lps) else None))
            self.taken += 1
            self.at += len(raw)
            self.chars += len(self.decoder.decode(raw))
        return out


def completion_logprobs(tok: Tokenizer, tokens: list[tuple[int, bytes, int, TokenLogprob | None]], top: int) -> dict:
    """The completions API's logprobs object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`);
    a prompt's first token has no log-probability (None)."""

    def alternatives(lp: TokenLogprob | None) -> dict | None:
        if lp is None:
            return None
        names = tok.tokens([i for i, _ in lp.top[:top]])
        return {n: v for n, (_, v) in zip(names, lp.top[:top])}

    return {
        "tokens": [spell(raw) for _, raw, _, _ in tokens],
        "token_logprobs": [None if lp is None else lp.logprob for *_, lp in tokens],
        "top_logprobs": [alternatives(lp) for *_, lp in tokens],
        "text_offset": [offset for _, _, offset, _ in tokens],
    }


def chat_logprobs(tok: Tokenizer, tokens: list[tuple[int, bytes, int, TokenLogprob | None]], top: int) -> dict:
    """The chat API's logprobs object: `content`, one entry per token with its bytes and alternatives."""

    def entry(raw: bytes, logprob: float) -> dict:
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    content = []
    for _, raw, _, lp in tokens:
        best = lp.top[:top]
        alts = [entry(b, v) for b, (_, v) in zip(tok.token_bytes([i for i, _ in best]), best)]
        content.append(entry(raw, lp.logprob) | {"top_logprobs": alts})
    return {"content": content, "refusal": None}
