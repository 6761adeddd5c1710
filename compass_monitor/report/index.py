"""The report's index pages: ``index.md`` and a small self-contained ``index.html`` (no external resources).

Each figure is listed with its title, its one-line reading and links to its PNG
and SVG files, after a table of the runs and the notes (alignment rule, figures
left out and why).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .render import FigureEntry

__all__ = ["RunRow", "write_index"]


@dataclass(frozen=True)
class RunRow:
    """One line of the runs table."""

    letter: str
    label: str
    path: str
    status: str
    snapshots: int
    steps: str
    matrices: int


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "figure{margin:2em 0}img{max-width:100%;border:1px solid #eee}.reading{font-size:1.05em}"
)


def _markdown(title: str, runs: Sequence[RunRow], notes: Sequence[str], figures: Sequence[FigureEntry]) -> str:
    lines = [f"# {title}", "", "| | run | path | status | snapshots | steps | matrices |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.letter} | {r.label} | `{r.path}` | {r.status} | {r.snapshots} | {r.steps} | {r.matrices} |" for r in runs]
    lines.append("")
    lines += [f"- {note}" for note in notes]
    for number, fig in enumerate(figures, start=1):
        png, svg = (f.name for f in fig.files)
        lines += ["", f"## {number}. {fig.title}", "", fig.reading, "", f"![{fig.title}]({png})", "", f"[SVG]({svg})"]
    return "\n".join(lines) + "\n"


def _html(title: str, runs: Sequence[RunRow], notes: Sequence[str], figures: Sequence[FigureEntry]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(r.letter)}</td><td>{e(r.label)}</td><td><code>{e(r.path)}</code></td><td>{e(r.status)}</td>"
        f"<td>{r.snapshots}</td><td>{e(r.steps)}</td><td>{r.matrices}</td></tr>"
        for r in runs
    )
    items = "".join(f"<li>{e(n)}</li>" for n in notes)
    body = "".join(
        f'<figure id="{e(fig.name)}"><h2>{number}. {e(fig.title)}</h2><p class="reading">{e(fig.reading)}</p>'
        f'<img src="{e(fig.files[0].name)}" alt="{e(fig.title)}"><figcaption><a href="{e(fig.files[1].name)}">SVG</a></figcaption></figure>'
        for number, fig in enumerate(figures, start=1)
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>'
        f"<body><h1>{e(title)}</h1><table><tr><th></th><th>run</th><th>path</th><th>status</th><th>snapshots</th><th>steps</th>"
        f"<th>matrices</th></tr>{rows}</table><ul>{items}</ul>{body}</body></html>\n"
    )


def write_index(out: Path, *, title: str, runs: Sequence[RunRow], notes: Sequence[str], figures: Sequence[FigureEntry]) -> tuple[Path, Path]:
    """Write ``index.md`` and ``index.html`` in ``out``; returns their paths."""
    md, page = out / "index.md", out / "index.html"
    md.write_text(_markdown(title, runs, notes, figures), encoding="utf-8")
    page.write_text(_html(title, runs, notes, figures), encoding="utf-8")
    return md, page
