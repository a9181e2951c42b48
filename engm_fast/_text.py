"""Plain-text output shared by the command-line reports (demo, benchmark)."""
from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], pad_last: bool = True) -> str:
    """``header`` and ``rows`` as left-aligned columns joined by `` | ``, under a ``-+-`` rule;
    ``pad_last=False`` leaves the last column (a free-text note) unpadded.

    Example::

        >>> print(format_table(["a", "bb"], [["xyz", "1"]]))
        a   | bb
        ----+---
        xyz | 1
    """
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    if not pad_last:
        widths[-1] = 0
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    rule = "-+-".join("-" * (w or 4) for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def or_na(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted by ``spec``, or ``"n/a"`` for ``None`` (a metric a run did not reach).

    Example::

        >>> or_na(0.12345), or_na(None), or_na(2.0, ".2f")
        ('0.123', 'n/a', '2.00')
    """
    return "n/a" if value is None else format(value, spec)
