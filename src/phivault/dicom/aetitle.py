"""Application Entity titles (PS3.5 §6.2, VR AE).

An AE title is 1 to 16 characters of the Default Character Repertoire (printable ASCII)
without backslash or control characters; leading and trailing spaces are not significant,
so a title of spaces only is no title (PS3.5 Table 6.2-1).
"""

from __future__ import annotations

from typing import Final

MAX_LENGTH: Final = 16


def ae_title_problem(value: str) -> str | None:
    """Why ``value`` is not a valid AE title, quoting PS3.5's rule; ``None`` if it is one."""
    if not value or len(value) > MAX_LENGTH:
        return f"an AE title has 1 to {MAX_LENGTH} characters (PS3.5 §6.2)"
    if any(not " " <= character <= "~" for character in value):
        return "an AE title has printable ASCII characters only, no control characters (PS3.5 §6.2)"
    if "\\" in value:
        return "an AE title cannot contain a backslash (PS3.5 §6.2)"
    if not value.strip(" "):
        return "an AE title cannot be all spaces (PS3.5 §6.2)"
    return None


def normalise_ae_title(value: str) -> str:
    """The significant part of an AE title: without leading and trailing spaces (as DIMSE
    peers pad it, PS3.8 §9.3.2); raises ``ValueError`` if it is not valid.
    """
    problem = ae_title_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value.strip(" ")
