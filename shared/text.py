"""Plain-text tables: what the CLI prints, and the summaries services return for it to print."""

from __future__ import annotations


def aligned(rows: list[list[str]]) -> str:
    """Rows as left-aligned columns two spaces apart, trailing blanks cut; the first row (the header) sets
    the columns, and a row may carry cells past them (printed as they are, e.g. an error)."""
    n = len(rows[0])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(n)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths + [0] * (len(r) - n))).rstrip() for r in rows
    )
