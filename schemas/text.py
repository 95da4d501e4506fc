"""Client text made safe to show: in a log line, an error message or a terminal, it stays one line."""

from __future__ import annotations

import re

# C0 and C1 controls (newlines, carriage returns, escape sequences), line and paragraph separators, and the
# bidirectional overrides that can make a line read differently from what it holds.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, *, limit: int | None = None) -> str:
    """`text` with control characters shown as escapes (`\\n`, `\\x1b`) and lone surrogates as `\\udXXX`, cut to
    `limit` characters first: what a client sent can no longer start a new log line or colour a terminal."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _UNPRINTABLE.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)
