"""Text from outside (an endpoint's error messages, model, input and output names, metadata), made
safe to print, log and put in a report.

An endpoint under audit may be hostile, and so may a model server behind the sidecar: its error
text can carry ANSI escape sequences that retitle the terminal, clear the screen or print a fake
"audit PASSED" line; a carriage return overwrites the line before it; a bidirectional override
reorders what is shown; a name can carry markdown or HTML. Every such string goes through
`printable` before it reaches a terminal, a log line or a report: escape sequences are removed
whole, every other control or formatting character (C0, DEL, C1, Unicode format characters such
as bidirectional overrides and zero-width characters, line and paragraph separators) is removed
or, for whitespace, becomes a space, and the length is bounded. `markdown_text` also escapes the
characters markdown and HTML give meaning to, for report.md; report.html escapes as it renders.
"""

from __future__ import annotations

import re
import unicodedata

MAX_CHARS = 300
# ESC followed by a CSI sequence (ESC [ params final), an OSC or other string sequence (ESC ] ...
# up to BEL or ESC \), or a single character; and the 8-bit CSI (0x9b)
_ESCAPE_SEQUENCE = re.compile(r"(\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?|\x1b[\]PX^_][^\x07\x1b\x9c]*(\x07|\x1b\\|\x9c)?|\x1b.?",
                              re.DOTALL)
_SPACES = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~&])")


def printable(text: object, limit: int | None = MAX_CHARS) -> str:
    """`text` as one line of plain characters: no escape sequence, control or formatting
    character, at most `limit` characters (None: no bound) with the number cut said at the end."""
    s = _ESCAPE_SEQUENCE.sub("", str(text))
    s = "".join(" " if c in _SPACES else c for c in s if c in _SPACES or unicodedata.category(c)[0] != "C")
    if limit is not None and len(s) > limit:
        s = f"{s[:limit]}... ({len(s) - limit} more characters)"
    return s


def markdown_text(text: object, limit: int | None = MAX_CHARS) -> str:
    """`printable(text)` with markdown and HTML metacharacters backslash-escaped, so that it shows
    as the characters it is (CommonMark lets any ASCII punctuation be escaped this way)."""
    return _MARKDOWN.sub(r"\\\1", printable(text, limit))
