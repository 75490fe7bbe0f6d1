"""What every request body shares: strict types (`"16"` or `true` is not a number, `"yes"` is not a
boolean, as in OpenAI's API), valid Unicode (a lone surrogate such as `"\\ud800"` gets 400), at most
`MAX_DEPTH` levels of nesting (deeper gets 400), the token and seed limits; and the one error shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from service.nesting import MAX_DEPTH, too_deep

MAX_TOKENS = 1_024
SEED = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer: the same seed gives the same sample")


def _surrogate(value: Any) -> str | None:
    """The path of the first string in `value` that is not valid Unicode, or None (a loop, not a recursion:
    `nesting.too_deep` has bounded the depth, but a deep walk must not spend the interpreter's stack)."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "the body"
        elif isinstance(item, dict | list):
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(reversed([(v, f"{where}.{k}".lstrip(".")) for k, v in pairs]))
    return None


def unsupported(param: str, what: str) -> PydanticCustomError:
    """The error for a parameter OpenAI defines and this server does not implement (400, OpenAI's wording)."""
    return PydanticCustomError(
        "unsupported_parameter",
        "Unsupported parameter: '{param}' is not supported by this server ({what}).",
        {"param": param, "what": what},
    )


class Body(BaseModel):
    """A request body: strict types, valid Unicode, bounded nesting."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def checked(cls, data: Any) -> Any:
        if too_deep(data):
            raise PydanticCustomError("too_deep", f"the body nests more than {MAX_DEPTH} levels deep")
        where = _surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode", f"{where}: text is not valid Unicode (a lone surrogate escape such as \\ud800)"
            )
        return data


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
