"""Errors a user can cause, as one readable line."""

from __future__ import annotations

from pydantic import ValidationError


def first_error(exc: ValidationError, where: str = "(root)") -> str:
    """The first of a pydantic error's problems as ``loc: message`` on one line.

    ``where`` names the location when the problem is the whole object. pydantic's
    "Value error, " prefix (from our own validators) is dropped: it says nothing to a user.
    """
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or where
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}"
