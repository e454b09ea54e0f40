"""Configuration errors in one line each: pydantic's errors with the dotted name of the bad field."""
from __future__ import annotations

from pydantic import ValidationError


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


__all__ = ["describe"]
