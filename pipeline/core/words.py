"""Counts in the words a user reads: "1 error", "2 errors", never "1 errors"."""

from __future__ import annotations

import re

_ES = re.compile(r"(ch|sh|ss|x)es$")


def counted(n: int, plural: str, spec: str = "") -> str:
    """`n` and the noun (given in the plural: "errors", "label files", "copies"),
    singular when n is 1; `spec` formats the number (",": 1,000)."""
    noun = plural if n != 1 else singular(plural)
    return f"{n:{spec}} {noun}"


def singular(plural: str) -> str:
    """The last word made singular: copies -> copy, matches -> match, files -> file."""
    if plural.endswith("ies"):
        return plural[:-3] + "y"
    if _ES.search(plural):
        return plural[:-2]
    return plural[:-1] if plural.endswith("s") and not plural.endswith("ss") else plural
