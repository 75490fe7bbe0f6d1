"""How deep a JSON value may nest: `MAX_DEPTH` levels of arrays and objects, checked without recursion.

Python's `json` parses and writes nested values by recursion, so a few hundred levels (a 3 KB body of
`[[[[...`) reach the interpreter's limit somewhere later (validation, storing a result, reading it back)
as a `RecursionError`. Every JSON value a client sends (request bodies, job records, batch lines) is
checked here first, so it is refused as bad input instead.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import InvalidRequest

MAX_DEPTH = 64  # a request's deepest real use (a JSON schema, chat content parts) is far below this


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects nest in `value` more than `limit` levels deep."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def loads(text: str | bytes) -> Any:
    """The JSON value of `text`; `InvalidRequest` for text that is not JSON or nests too deep."""
    try:
        value = json.loads(text)
        deep = too_deep(value)
    except ValueError as e:
        raise InvalidRequest(f"not JSON: {e}") from None
    except RecursionError:
        deep = True
    if deep:
        raise InvalidRequest(f"JSON nested more than {MAX_DEPTH} levels deep")
    return value
