"""Tool calls on chat, in the format Hermes-style chat templates (Qwen2.5's among them) teach the model:
each call a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`.

The tools go into the prompt through the chat template (a template that writes no tools is a 400: the
model would not know them). With `tool_choice` "auto" the reply is read after generation (`parse`): its
calls become OpenAI's `tool_calls` and the text around them its content. "required" and a named function
are constrained (`forced`): a grammar (`service.engine.grammar`) that allows only calls, each a JSON
object valid against its function's parameters, one or (with `parallel_tool_calls`) several. "none"
leaves the tools out of the prompt. Streamed, content goes out as it comes until a call begins
(`Held`); the calls follow whole, as `tool_calls` deltas, when the reply ends: a call never leaks into
the content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from service.engine.detok import held_back
from service.engine.grammar import JSON_STYLE
from service.errors import Unsupported
from service.server.schemas.openai import ChatRequest, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def offered(req: ChatRequest, takes_tools: bool) -> list[dict] | None:
    """The tools as chat templates take them, or None (no tools, or `tool_choice` none); a 400 when the
    model's chat template writes no tools."""
    if not req.tools or req.tool_choice == "none":
        return None
    if not takes_tools:
        raise Unsupported(
            "this model's chat template has no tools, so the model cannot be told of them "
            "(serve with --chat-template FILE to give it one that has)",
            param="tools",
        )
    return [t.model_dump(exclude_none=True) for t in req.tools]


def forced(req: ChatRequest, tokens: bool) -> str | None:
    """The Lark grammar of the calls `tool_choice` requires ("required": any of the tools; a named
    function: that one), or None. With `tokens`, `<tool_call>` and `</tool_call>` are tokens of the
    vocabulary (Qwen2.5's), which a grammar names as tokens: their text is not what the model writes."""
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        return None
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in req.tools
        if named in (None, t.function.name)
    ]
    body = json.dumps({"anyOf": schemas, "x-guidance": JSON_STYLE})
    calls = 'call ("\\n" call)*' if req.parallel_tool_calls else "call"
    start, end = (OPEN, CLOSE) if tokens else (f'"{OPEN}"', f'"{CLOSE}"')
    return f'start: {calls}\ncall: {start} "\\n" body "\\n" {end}\nbody: %json {body}\n'


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A reply's content (None when empty) and its calls as OpenAI's `tool_calls`; a call that is not a
    JSON object with a name stays in the content, as written; one cut short at the end (max_tokens) is
    dropped."""
    content, calls = _split(text)
    return content.strip() or None, calls


def _split(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The text outside the calls, and the calls."""
    calls, kept, at = [], [], 0
    for m in CALL.finditer(text):
        try:
            value = json.loads(m.group(1))
            name, arguments = value["name"], value.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            continue
        kept.append(text[at : m.start()])
        at = m.end()
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}
        )
    tail = text[at:]
    unfinished = tail.rfind(OPEN)
    if unfinished != -1 and CLOSE not in tail[unfinished:]:
        tail = tail[:unfinished]  # a call cut short (max_tokens): not content, and no call
    return "".join(kept) + tail, calls


class Held:
    """A streamed reply's content while it may hold calls: text goes out as it comes, but for a tail that
    could begin `<tool_call>` (held until it cannot) and everything from a call's start on."""

    def __init__(self):
        self.text = ""
        self.sent = 0
        self.calling = False

    def take(self, piece: str) -> str:
        """The content that `piece` lets out."""
        self.text += piece
        if self.calling:
            return ""
        start = self.text.find(OPEN, max(0, self.sent - len(OPEN)))
        if start != -1:
            self.calling = True
            end = start
        else:
            end = len(self.text) - held_back(self.text, (OPEN,))
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def rest(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: the content not yet sent (what is outside the calls; trailing space dropped when
        there are calls), and the calls."""
        content, calls = _split(self.text)  # the content starts with what was sent: it preceded any call
        out = content[self.sent :]
        return (out.rstrip() if calls else out), calls
