"""metrics.json and the learning-curve PNG of a run."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import write_json_atomic


def write_metrics(run: Path, metrics: dict) -> Path:
    path = Path(run) / "metrics.json"
    write_json_atomic(path, metrics)
    return path


def plot_curves(run: Path, history: list, metric: str, title: str) -> Path | None:
    """Loss and the headline metric per epoch, train and validation, into `curves.png`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    names = ["loss"] + ([metric] if metric != "loss" else [])
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [h[split].get(name) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(run) / "curves.png"
    tmp = path.with_name(".curves.png.tmp")
    figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    tmp.replace(path)
    return path
