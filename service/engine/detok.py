"""Incremental detokenization with stop strings.

Text is emitted only when it is final: never half of a UTF-8 character (a byte-level token that
ends mid-character decodes to U+FFFD, so we wait for the next token), and never the start of what
may become a stop string (the longest suffix that is a prefix of a stop string is held back).
"""

from __future__ import annotations

from model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` to hold back: the longest suffix that begins one of
    `stops` (and may become it with what comes next)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # token offsets: decode context start, end of decoded tokens
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final (maybe empty). Sets `stopped` when a stop
        string appeared: the text up to it is returned, the stop string never is."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for its remaining bytes
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        return self._release(0 if self.stopped else held_back(self.text, self.stop))

    def finish(self) -> str:
        """The rest of the text at the end of generation; a trailing incomplete character is dropped."""
        if not self.stopped and self.read < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self.prefix :])[
                len(self.tokenizer.decode(self.ids[self.prefix : self.read])) :
            ]
            self.text += tail.rstrip(REPLACEMENT)
        return self._release(0)

    def _release(self, hold: int) -> str:
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out
