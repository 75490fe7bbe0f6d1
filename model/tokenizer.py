"""Tokenizer wrapper: a fast tokenizer read from a model directory, its chat template, and the
token ids that end a turn. Text lives here and at the service's edges; the engine sees ids only."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never contact a hub

from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

# Tokens that end an assistant turn or a document in the families we load.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for one raw byte


def spell(raw: bytes) -> str:
    """A token's bytes as text, or OpenAI's `bytes:\\xNN...` when they are not whole characters."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@cache
def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


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
        self.byte_level = "ByteLevel" in str(self.hf.backend_tokenizer.decoder)
        self.special_ids = frozenset(self.hf.all_special_ids)
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
        """Each token's own text, spelled from its bytes (`spell`: part of a character is `bytes:\\xNN`)."""
        return [spell(raw) for raw in self.token_bytes(ids)]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """The bytes each token stands for (a byte-level token may hold part of a character). Byte-level
        BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM2) spell bytes with GPT-2's alphabet; SentencePiece
        ones write a raw byte as `<0xNN>` and a space as U+2581; special tokens are their own text."""
        table = byte_level_table() if self.byte_level else {}
        out = []
        for i, token in zip(ids, self.hf.convert_ids_to_tokens(ids)):
            raw = BYTE_FALLBACK.fullmatch(token)
            if i in self.special_ids or (table and not all(c in table for c in token)):
                out.append(token.encode())
            elif table:
                out.append(bytes(table[c] for c in token))
            elif raw:
                out.append(bytes([int(raw.group(1), 16)]))
            else:
                out.append(token.replace("\u2581", " ").encode())
        return out

    def use_template(self, template: str) -> None:
        """Use this chat template (Jinja text, e.g. from `--chat-template FILE`) instead of the model's."""
        self.hf.chat_template = template
        self.has_chat_template = True

    def is_token(self, text: str) -> bool:
        """Whether `text` is one token of the vocabulary (an added token such as Qwen2.5's `<tool_call>`)."""
        return self.hf.convert_tokens_to_ids(text) not in (None, self.hf.unk_token_id)

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template writes a list of tools into the prompt."""
        return self.has_chat_template and "tools" in self.hf.chat_template

    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for a conversation (with the `tools` the model may call, when the template takes
        them), ready for the assistant's turn. Without a chat template, the messages are joined as plain
        text."""
        if self.has_chat_template:
            text = self.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
        return self.encode(text)
