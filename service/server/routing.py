"""Which replica serves a request under `nlg serve --ray`: the one that last served the same leading span
of prompt text, so that its prefix cache is warm, unless it is loaded past a bound; otherwise the least
loaded one. The ingress has no model and does not tokenize, so the key is text.

The key is the prompt's leading text, read from the request body in the order our prompts lay it out:
a chat's messages (the system prompt, then each turn), /v1/answer's passages before its question,
/v1/summarize's document, a completion's prompt, a response's instructions before its input; for any
other body (an upload, a form), the body itself. That text is cut into spans of `SPAN` characters (about
64 tokens, four KV blocks), and for each leading run of whole spans the router remembers the replica that
served it last. A request goes to the replica of its longest remembered run. Why a leading run of whole
spans: the engine's prefix cache reuses a prompt's leading full blocks and nothing after the first
difference, so only a shared leading span saves work, and two prompts that share a passage but not the
text before it share no cache. A text shorter than one span keys nothing (there is no prefill worth
keeping warm) and goes to the least loaded replica.

Load is what the ingress has in flight on each replica. `bound` is the requests a replica runs at once
(its `--slots`): past it a request would wait in the replica's queue, so the prefix replica is skipped for
the least loaded. A replica found down (its actor died, a probe went unanswered) is skipped until a probe
finds it up again.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

SPAN = 256  # characters per span of the routing key
KEY_SPANS = 64  # spans a key reaches at most (16k characters): past that, two prompts are one route anyway
REMEMBER = 1 << 16  # span runs remembered (least recently routed forgotten first)
HOME_PATHS = ("/v1/files", "/v1/batches", "/v1/jobs")  # state kept in one replica's store: always that one


def prompt_text(path: str, body: bytes, content_type: str = "application/json") -> str:
    """The leading text of the prompt a request makes, in the order the prompt lays it out (module doc)."""
    if not content_type.startswith("application/json"):
        if "boundary=" in content_type:  # a form's boundary is new every request: not part of the content
            body = body.replace(content_type.split("boundary=", 1)[1].strip('"').encode(), b"")
        return body.decode("latin-1")
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("latin-1")
    if not isinstance(data, dict):
        return ""
    if path.endswith("/chat/completions"):
        return "".join(f"{m.get('role')}: {_text(m.get('content'))}\n" for m in _list(data.get("messages")))
    if path.endswith("/responses"):
        return _text(data.get("instructions")) + "\n" + _text(data.get("input"))
    if path.endswith("/completions") or path.endswith("/embeddings"):
        return _text(data.get("prompt", data.get("input")))
    if path.endswith("/answer"):
        return "\n\n".join(_text(p) for p in _list(data.get("passages"))) + "\n\n" + _text(data.get("question"))
    if path.endswith("/summarize"):
        return _text(data.get("document", data.get("documents")))
    return body.decode("latin-1")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _text(value) -> str:
    """The text in a content value: a string, a list of parts or of strings, a dict with text or content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value.get("text", value.get("content", "")))
    return ""


def span_keys(text: str) -> list[bytes]:
    """A key for each leading run of whole spans of `text` (up to `KEY_SPANS`), shortest first."""
    keys, h = [], hashlib.blake2b(digest_size=16)
    for start in range(0, min(len(text) - SPAN + 1, KEY_SPANS * SPAN), SPAN):
        h.update(text[start : start + SPAN].encode("utf-8", "surrogatepass"))
        keys.append(h.copy().digest())
    return keys


class PrefixRouter:
    def __init__(self, replicas: int, bound: int, by_prefix: bool = True):
        """`replicas` replicas, each running `bound` requests at once; without `by_prefix`, round robin
        (`nlg serve --routing round-robin`, the baseline of `nlg bench replicas`)."""
        self.bound, self.by_prefix = bound, by_prefix
        self.load = [0] * replicas
        self.up = [True] * replicas
        self.last: OrderedDict[bytes, int] = OrderedDict()
        self.turn = 0  # rotates the choice among equally loaded replicas

    def order(self, keys: list[bytes]) -> tuple[list[int], str]:
        """The replicas to try, best first, and why the first: "prefix" (it served the longest remembered
        run of these keys last and is under the bound), "least_loaded" or "round_robin". Replicas that are
        down come last."""
        n = len(self.load)
        self.turn = (self.turn + 1) % n
        rotated = [(self.turn + i) % n for i in range(n)]
        if not self.by_prefix:
            return sorted(rotated, key=lambda i: not self.up[i]), "round_robin"
        ranked = sorted(rotated, key=lambda i: (not self.up[i], self.load[i]))
        for key in reversed(keys):
            i = self.last.get(key)
            if i is not None:
                if self.up[i] and self.load[i] < self.bound:
                    return [i] + [j for j in ranked if j != i], "prefix"
                break
        return ranked, "least_loaded"

    def served(self, keys: list[bytes], replica: int) -> None:
        """`replica` now holds these keys' runs in its cache."""
        for key in keys:
            self.last[key] = replica
            self.last.move_to_end(key)
        while len(self.last) > REMEMBER:
            self.last.popitem(last=False)
