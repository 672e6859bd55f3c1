"""Plots and Markdown tables shared by ``fedcbir demo``, ``fedcbir study`` and ``make bench``.

matplotlib with the Agg backend (no display needed); every figure is written atomically
(temp file + rename), so a report folder never holds a half-written PNG.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from common.io import atomic_path


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
              xlabel: str, ylabel: str, title: str, bands: Mapping[str, Sequence[float]] | None = None,
              hline: tuple[float, str] | None = None, integer_x: bool = False) -> Path:
    """One line per label: ``series[label] = (xs, ys)``; optional ``bands[label]`` = ± per point
    (shaded), optional horizontal reference line ``(y, label)``; ``integer_x``: whole-number
    ticks on the x axis (rounds, epochs)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, (xs, ys) in series.items():
        line, = ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
        if bands and label in bands:
            lo = [y - d for y, d in zip(ys, bands[label])]
            hi = [y + d for y, d in zip(ys, bands[label])]
            ax.fill_between(list(xs), lo, hi, alpha=0.2, color=line.get_color())
    if hline is not None:
        ax.axhline(hline[0], linestyle="--", color="grey", linewidth=1, label=hline[1])
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars(path: str | os.PathLike, groups: Sequence[str], bars: Mapping[str, Sequence[float]], *,
                 ylabel: str, title: str, errors: Mapping[str, Sequence[float]] | None = None) -> Path:
    """Grouped bar chart: one group per ``groups`` entry, one bar per ``bars`` label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    n = max(1, len(bars))
    width = 0.8 / n
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        err = list(errors[label]) if errors and label in errors else None
        ax.bar(xs, list(values), width=width, label=label, yerr=err, capsize=3 if err else 0)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(bars) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted with ``str``)."""
    out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
