"""Configuration errors in one line each: pydantic's errors with the dotted name of the bad field."""
from __future__ import annotations

from typing import Any, Iterable

from pydantic import AfterValidator, ValidationError


def describe(e: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line, ``field.sub: what is wrong (got value)`` per problem, joined by "; "."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        got = err.get("input")
        parts.append(f"{loc}: required" if err["type"] == "missing" else f"{loc or 'config'}: {msg} (got {got!r})")
    return "; ".join(parts)


def one_of(names: Iterable[str], what: str, ordered: bool = False) -> AfterValidator:
    """A pydantic validator: the value (or None) must be one of ``names`` (a registry's keys); the error
    lists what is accepted, sorted unless ``ordered``."""
    def check(value: Any) -> Any:
        if value is not None and value not in names:
            shown = list(names) if ordered else sorted(names)
            raise ValueError(f"{value!r} is not a {what}; accepted: {', '.join(shown)}")
        return value

    return AfterValidator(check)


__all__ = ["describe", "one_of"]
