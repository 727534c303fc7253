"""Figures without pyplot: a `matplotlib.figure.Figure` renders with the Agg canvas when saved,
so drawing here never touches the user's backend or global pyplot state."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 100  # small PNGs: the committed report stays a few hundred KB


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path
