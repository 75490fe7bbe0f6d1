"""What every request body shares: strict types (`"16"` or `true` is not a number, `"yes"` is not a
boolean, as in OpenAI's API), valid Unicode (a lone surrogate such as `"\\ud800"` gets 400), the token
and seed limits; and the one error shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

MAX_TOKENS = 1_024
SEED = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer: the same seed gives the same sample")


def _surrogate(value: Any, where: str) -> str | None:
    """The path of the first string in `value` that is not valid Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the body"
    elif isinstance(value, dict):
        return next((w for k, v in value.items() if (w := _surrogate(v, f"{where}.{k}".lstrip(".")))), None)
    elif isinstance(value, list):
        return next((w for i, v in enumerate(value) if (w := _surrogate(v, f"{where}.{i}".lstrip(".")))), None)
    return None


def unsupported(param: str, what: str) -> PydanticCustomError:
    """The error for a parameter OpenAI defines and this server does not implement (400, OpenAI's wording)."""
    return PydanticCustomError(
        "unsupported_parameter",
        "Unsupported parameter: '{param}' is not supported by this server ({what}).",
        {"param": param, "what": what},
    )


class Body(BaseModel):
    """A request body: strict types, valid Unicode."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        where = _surrogate(data, "")
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
