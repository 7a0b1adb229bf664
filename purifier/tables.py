"""Tables for people: one header row plus data rows, rendered as aligned text, markdown or HTML.

The one table renderer of the project: the audit's stdout table and `report.md`, the demo's
comparison table and docs/results.md all go through it. Cells are rendered with
`str`; callers format numbers before (each table knows its own precision).
"""

from __future__ import annotations

from collections.abc import Sequence

Row = Sequence[object]


def text_table(header: Row, rows: Sequence[Row]) -> str:
    """Left-aligned columns two spaces apart, the header underlined with dashes.

    Every line is padded to the full column widths (the last column included), so the columns
    line up whatever follows."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def markdown_table(header: Row, rows: Sequence[Row]) -> str:
    """A GitHub-flavoured markdown table (no alignment markers)."""
    def line(r: Row) -> str:
        return "| " + " | ".join(str(c) for c in r) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def html_table(header: Row, rows: Sequence[Row], css_class: str = "") -> str:
    """An HTML table of escaped text (callers pass no markup). A cell may be a (text, note) pair:
    the note goes on a second line in a `<small>` element."""
    from html import escape

    def cell(c) -> str:
        if isinstance(c, tuple):
            return f"{escape(str(c[0]))}<br><small>{escape(str(c[1]))}</small>"
        return escape(str(c))

    def line(r: Row, tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{cell(c)}</{tag}>" for c in r) + "</tr>"

    cls = f' class="{escape(css_class)}"' if css_class else ""
    return (f"<table{cls}><thead>{line(header, 'th')}</thead><tbody>"
            + "".join(line(r, "td") for r in rows) + "</tbody></table>")
