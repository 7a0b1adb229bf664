"""Strings from outside (an endpoint's error text, names, metadata) reach terminals and reports as
plain characters: `purifier.untrusted`, the one sanitizer (issue 21, item 8)."""

import re

import pytest

from purifier.untrusted import markdown_text, printable

HOSTILE = {
    "window title (OSC)": ("ok\x1b]0;pwned\x07 done", "ok done"),
    "screen clear and home (CSI)": ("a\x1b[2J\x1b[Hb", "ab"),
    "carriage return over a fake line": ("failed\r\x1b[32maudit PASSED\x1b[0m", "failed audit PASSED"),
    "newline": ("one\ntwo", "one two"),
    "8-bit CSI": ("x\x9b31my", "xy"),
    "reset (ESC c)": ("x\x1bcy", "xy"),
    "hyperlink (OSC 8, ST)": ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),
    "bidi override": ("abc\u202edef", "abcdef"),
    "zero width": ("a\u200bb", "ab"),
    "NUL, BEL, DEL": ("a\x00b\x07c\x7fd", "abcd"),
    "line separator": ("a\u2028b", "a b"),
}


@pytest.mark.parametrize("text,expected", HOSTILE.values(), ids=HOSTILE.keys())
def test_printable_keeps_only_plain_characters(text, expected):
    assert printable(text) == expected


def test_printable_bounds_the_length_and_says_so():
    assert printable("x" * 1000, 10) == "xxxxxxxxxx... (990 more characters)"
    assert printable("x" * 1000, None) == "x" * 1000
    assert printable("é ü 漢字 ok") == "é ü 漢字 ok"  # printable text of any script is kept


def test_markdown_text_shows_markup_as_text():
    md = markdown_text("<img src=x onerror=alert(1)> [click](javascript:alert(1)) **b** | c | `d` # e\x1b[2J")
    assert re.search(r"(?<!\\)[<>\[\]()*`|#]", md) is None and "\x1b" not in md  # every metacharacter escaped
    assert md.replace("\\", "") == "<img src=x onerror=alert(1)> [click](javascript:alert(1)) **b** | c | `d` # e"
