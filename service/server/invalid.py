"""A request body that does not validate, described the way OpenAI's API describes it (400, with OpenAI's
messages, `param` in its `messages[0].role` form and its codes), so that `openai.BadRequestError` and
the libraries that read OpenAI's wording catch it. One function for every route.
"""

from __future__ import annotations

from typing import Any

KINDS = {str: "a string", bool: "a boolean", int: "an integer", float: "a decimal", list: "an array", dict: "an object"}
EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a decimal",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
UNION_TAGS = {  # how pydantic names the members of a union in an error's location
    "str": "a string",
    "list[str]": "an array of strings",
    "list[int]": "an array of integers",
    "list[list[int]]": "an array of arrays of integers",
    "list[TextPart]": "an array of content parts",
}


def kind(value: Any) -> str:
    return "null" if value is None else KINDS.get(type(value), type(value).__name__)


def split(loc: tuple) -> tuple[str, str | None]:
    """The parameter (`messages[0].role`) and the union member the error is about, if any."""
    param, tag = "", None
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in UNION_TAGS or "[" in part or part.startswith("function-"):
            tag = part
            break
        else:
            param += f".{part}" if param else part
    return param, tag


def describe(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for pydantic's errors of one body, from the first."""
    first = errors[0]
    param, tag = split(first["loc"])
    kind_, ctx, value = first["type"], first.get("ctx") or {}, first.get("input")
    if kind_ == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind_ == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unrecognized_argument"
    if kind_ == "unsupported_parameter":
        return first["msg"], ctx.get("param", param), kind_
    if tag is not None:  # a union: name every member it could have been
        tags = [t for e in errors if split(e["loc"])[0] == param and (t := split(e["loc"])[1])]
        wanted = " or ".join(dict.fromkeys(UNION_TAGS.get(t, t) for t in tags))
        got = next((e["input"] for e in errors if e["loc"][-1] == tag), value)
        return f"Invalid type for '{param}': expected {wanted}, but got {kind(got)} instead.", param, "invalid_type"
    if kind_ in EXPECTED:
        message = f"Invalid type for '{param}': expected {EXPECTED[kind_]}, but got {kind(value)} instead."
        return message, param, "invalid_type"
    if kind_ in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        key = next(k for k in ("le", "lt", "ge", "gt") if k in ctx)
        bound, sign = ctx[key], {"le": "<=", "lt": "<", "ge": ">=", "gt": ">"}[key]
        number = "decimal" if isinstance(bound, float) else "integer"
        side = "above maximum" if key in ("le", "lt") else "below minimum"
        code = f"{number}_{'above_max' if key in ('le', 'lt') else 'below_min'}_value"
        message = (
            f"Invalid '{param}': {number} {side} value. Expected a value {sign} {bound:g}, but got {value} instead."
        )
        return message, param, code
    if kind_ == "literal_error":
        message = f"Invalid value for '{param}': '{value}'. Supported values are: {ctx.get('expected')}."
        return message, param, "invalid_value"
    if kind_ == "too_short" and value == []:
        least = ctx.get("min_length")
        message = (
            f"Invalid '{param}': empty array. Expected an array with minimum length {least}, "
            "but got an empty array instead."
        )
        return message, param, "empty_array"
    if kind_ == "too_long" and isinstance(value, list):
        message = (
            f"Invalid '{param}': array too long. Expected an array with maximum length {ctx.get('max_length')}, "
            f"but got an array with length {len(value)} instead."
        )
        return message, param, "array_above_max_length"
    reason = first["msg"].removeprefix("Value error, ")
    message = f"Invalid '{param}': {reason}" if param else reason
    return message, param or None, "invalid_value" if kind_ == "value_error" else kind_
