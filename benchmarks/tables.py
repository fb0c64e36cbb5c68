"""The one table format of every benchmark's Markdown: :func:`markdown_table`."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown_table"]


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        value = f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, align: str | None = None
) -> str:
    """A GitHub Markdown table.

    Args:
        headers: column titles.
        rows: one sequence of cells per row, as long as ``headers`` (shorter rows are padded
            with empty cells). Cells are strings (used as given, with ``|`` escaped), None
            (written "—") or numbers (floats to 3 significant digits, or whole numbers with
            thousands separators from 1,000 on); format a cell yourself for anything else.
        align: one letter per column, ``l``, ``r`` or ``c``; default: left-aligned.

    Returns:
        The table's lines joined by newlines, with a final newline.
    """
    width = len(headers)
    align = align or "l" * width
    if len(align) != width or set(align) - set("lrc"):
        raise ValueError(f"align must hold one of l, r, c per column ({width}), got {align!r}")
    rules = {"l": "---", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join(rules[a] for a in align) + "|")
    for row in rows:
        if len(row) > width:
            raise ValueError(f"a row has {len(row)} cells for {width} columns: {list(row)!r:.200}")
        cells = [_cell(value) for value in row] + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
