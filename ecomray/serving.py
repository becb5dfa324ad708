"""What every family's serving API shares: the strict request base, the response base (model version and
warnings), and the edge checks the generic deployment applies to every request of every family.

A family's task module builds its request and response models from these (`api(limits)`), so a new family gets
the checks without writing them: text must be valid Unicode (no lone surrogates, which JSON can carry but UTF-8
can't encode), numbers finite and within +-2**53, and error messages never echo more than a short prefix of the
input.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ecomray.features import text as text_features

MAX_ABS_NUMBER = float(2**53)     # beyond this a float can't hold every integer; nothing we serve needs more
ECHO_CHARS = 64                   # at most this many characters of a client's input come back in an error


NOT_BLANK = text_features.NOT_BLANK       # "has a non-blank character": one rule offline and online


class Strict(BaseModel):
    """Request bodies: no type coercion (a "5" is not 5), unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else v


# An integer field that also takes an integral JSON number such as 5.0 (JSON Schema's `integer` allows it, so the
# OpenAPI contract does), still strict otherwise: "5" and 5.5 are refused.
Int = Annotated[int, BeforeValidator(_integral)]                   # give it bounds with Field(ge=..., le=...)
# A free integer value (a member of a union type, a categorical code): within +-2**53, stated in the schema (the
# bounds must come before the validator to reach it, and Field(ge, le) on such a type would be dropped: use Int there).
Integer = Annotated[int, Ge(-2**53), Le(2**53), BeforeValidator(_integral)]
# A number field: finite and within +-2**53, stated in the OpenAPI schema so that the contract is what the edge checks.
Number = Annotated[float, Field(ge=-MAX_ABS_NUMBER, le=MAX_ABS_NUMBER, allow_inf_nan=False)]


class ModelRef(BaseModel):
    name: str
    version: str


class Response(BaseModel):
    """Every answer names the registry version that produced it."""

    model: ModelRef
    warnings: list[str] = Field(default_factory=list)


def clip(value: Any, n: int = ECHO_CHARS) -> str:
    """A short, printable prefix of a client's value, for error messages."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def edge_errors(body: Any, loc: tuple = ("body",), limit: int = 20) -> list[dict[str, Any]]:
    """422 details for values no model can take, anywhere in a parsed request body, in document order, at most
    `limit`: text that is not valid Unicode (a lone surrogate such as "\\ud800"), numbers that are not finite or
    beyond +-2**53. Keys are checked like values.

    A walk with a stack of iterators, in time linear in the body: a value's location is a link to its container's,
    spelled out only for an error (copying the path at every level made a body of lists nested 900 deep take
    seconds, on the event loop that every other request waits on)."""
    errors: list[dict[str, Any]] = []

    def where(node: tuple | None, last: Any) -> list[Any]:
        parts = [last]
        while node is not None:
            node, part = node
            parts.append(part)
        return [*loc, *reversed(parts)]

    def problem(v: Any) -> tuple[str, str] | None:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "text is not valid Unicode (unpaired surrogate)", "string_unicode"
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                ok = math.isfinite(v) and abs(v) <= MAX_ABS_NUMBER
            except OverflowError:                     # an int too large to compare as a float
                ok = False
            if not ok:
                return "number must be finite and within +-2**53", "number_out_of_range"
        return None

    def entries(v: Any) -> Any:
        return iter(v.items()) if isinstance(v, dict) else enumerate(v)

    if not isinstance(body, (dict, list, tuple)):
        bad = problem(body)
        return [{"loc": list(loc), "msg": bad[0], "type": bad[1]}] if bad and limit > 0 else []
    stack: list[tuple[Any, tuple | None, bool]] = [(entries(body), None, isinstance(body, dict))]
    while stack and len(errors) < limit:
        it, node, keyed = stack[-1]
        for k, x in it:
            if keyed and isinstance(k, str):
                if problem(k):
                    errors.append({"loc": where(node, clip(k)), "msg": "key is not valid Unicode",
                                   "type": "string_unicode"})
                    if len(errors) >= limit:
                        break
                    continue
                k = clip(k)
            if isinstance(x, (dict, list, tuple)):
                stack.append((entries(x), (node, k), isinstance(x, dict)))   # into it now: document order
                break
            bad = problem(x)
            if bad:
                errors.append({"loc": where(node, k), "msg": bad[0], "type": bad[1]})
                if len(errors) >= limit:
                    break
        else:
            stack.pop()
    return errors


def clean_details(details: list[dict[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    """Validation errors as `{loc, msg, type}` with every location part clipped: a 500k-character key must not
    come back whole inside a 422."""
    out = []
    for d in details[:limit]:
        loc = [p if isinstance(p, int) else clip(p) for p in d.get("loc", [])]
        out.append({"loc": loc, "msg": clip(str(d.get("msg", "")), 300), "type": str(d.get("type", "value_error"))})
    return out
