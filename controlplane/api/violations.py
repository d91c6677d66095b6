"""Violations: what is wrong with a policy document, where, in the user's own words.

pydantic reports errors as (type, location, message); users wrote YAML. This module turns
each error into a YAML path (``spec.limits[1].per``) and a short message, never pydantic's
"Input should be …" phrasing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from controlplane.api.base import FieldError


@dataclass(frozen=True)
class Violation:
    source: str  # file name, or a Kubernetes object reference
    index: int | None  # document index in the YAML stream (0-based); None for the source
    kind: str | None
    name: str | None  # namespace/name
    path: str  # YAML path (spec.limits[1].per); empty for the document as a whole
    message: str

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source}[{self.index}]"
        subject = " ".join(part for part in (self.kind, self.name) if part)
        head = f"{where} {subject}" if subject else where
        return f"{head}: {self.path}: {self.message}" if self.path else f"{head}: {self.message}"


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def render_path(loc: Sequence[Any]) -> str:
    """``('spec', 'limits', 1, 'per')`` → ``spec.limits[1].per``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:  # map keys such as label names: app.kubernetes.io/name
            out += f'["{part}"]'
    return out


_TYPE_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be a boolean",
    "bool_parsing": "must be a boolean",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
}


def _choices(expected: str) -> list[str]:
    # pydantic's context renders literals as "'a', 'b' or 'c'".
    return re.findall(r"'((?:[^'\\]|\\.)*)'", expected)


def error_message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind]
    if kind in ("literal_error", "enum"):
        choices = _choices(str(ctx.get("expected", "")))
        if len(choices) == 1:
            return f"must be {choices[0]}"
        return f"must be one of {', '.join(choices)}"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        unit = "characters" if kind == "string_too_short" else "items"
        return "must not be empty" if least == 1 else f"must have at least {least} {unit}"
    if kind in ("too_long", "string_too_long"):
        unit = "characters" if kind == "string_too_long" else "items"
        return f"must have at most {ctx.get('max_length')} {unit}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message.replace("Input should be", "must be")


def from_validation_error(err: ValidationError) -> list[tuple[str, str]]:
    """Every error as ``(yaml path, message)``, in document order, without repeats."""
    out: list[tuple[str, str]] = []
    for error in err.errors(include_url=False):
        loc = list(error["loc"])
        message = error_message(error)
        if "[key]" in loc:  # a bad map key, not a bad value
            at = loc.index("[key]")
            loc[at - 1 : at + 1] = [str(loc[at - 1])]
            message = f"key {message}"
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.extend(cause.loc)
        item = (render_path(loc), message)
        if item not in out:
            out.append(item)
    return out
