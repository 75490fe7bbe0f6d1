"""Tokenizer wrapper: a fast tokenizer read from a model directory, its chat template, and the
token ids that end a turn. Text lives here and at the service's edges; the engine sees ids only."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never contact a hub

from transformers import PreTrainedTokenizerFast  # noqa: E402

# Tokens that end an assistant turn or a document in the families we load.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class Tokenizer:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        self.hf = PreTrainedTokenizerFast.from_pretrained(str(directory))
        vocab = self.hf.get_vocab()
        ids = {vocab[t] for t in END_TOKENS if t in vocab}
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        self.stop_ids: frozenset[int] = frozenset(ids)
        self.has_chat_template = bool(self.hf.chat_template)
        # The longest token's spelling: a text of n characters has at least n / (2 * this) tokens (the 2
        # leaves room for normalizers that merge characters), a bound known without tokenizing.
        self.max_token_chars = max(map(len, vocab), default=1)

    def least_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))`, in constant time."""
        return len(text) // (2 * self.max_token_chars)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def tokens(self, ids: list[int]) -> list[str]:
        """The text of each token on its own (bytes that are not whole characters show as U+FFFD)."""
        return [self.hf.decode([i], clean_up_tokenization_spaces=False) for i in ids]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a conversation, ready for the assistant's turn. Without a chat template,
        the messages are joined as plain text."""
        if self.has_chat_template:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
        return self.encode(text)
