"""The engine's input checks, in one place: token ids the model can embed, prompts that fit its context.
Routes check before they queue anything (a clear 400 naming the numbers); the scheduler checks again on
the engine thread, whatever the caller checked."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import ContextOverflow, InvalidRequest


@dataclass
class Limits:
    """What the model can take: `context` positions per sequence, ids below `vocab_size` (one object,
    shared by the runner, the scheduler and the routes)."""

    context: int
    vocab_size: int

    def check_tokens(self, ids: list[int], param: str = "prompt") -> None:
        """Refuse token ids the model has no embedding for (they would fail its forward)."""
        vocab = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad} is outside the vocabulary of {vocab} tokens (ids 0 to {vocab - 1})", param=param
            )

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequest("prompt is empty", param="prompt")
        if prompt_len + max_tokens > self.context:
            raise ContextOverflow.too_long(self.context, prompt_len, max_tokens)

    def check_prompt(self, ids: list[int], max_tokens: int = 0) -> None:
        self.check_tokens(ids)
        self.check_fits(len(ids), max_tokens)
