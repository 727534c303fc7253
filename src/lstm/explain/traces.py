"""Gate traces of every recurrent layer of any model, and their picture.

    with recording_gates(model) as traces:
        model(x)
    traces["lstm"]["f"]     # [B, T, U] forget gates of the layer named "lstm", in processing order

Inside the block each recurrent layer keeps its last call's internals (`record_gates`); on exit
they are copied into `traces` (detached) and the layers are put back as they were, so nothing is
kept once the block ends. Bidirectional models show up as their forward_/backward_ layers (the
backward one in its processing order: reversed time).
"""

from __future__ import annotations

import contextlib
import textwrap
from typing import Iterator, Optional

import numpy as np
import torch

from ..layers import RNN
from .figures import new_figure, save

# what each key is, and its value range on the colour scale (None: symmetric around 0, from the data)
KEYS = {
    "i": ("input gate i_t", (0, 1)), "f": ("forget gate f_t", (0, 1)), "c_tilde": ("candidate C̃_t", (-1, 1)),
    "c": ("cell state C_t", None), "o": ("output gate o_t", (0, 1)), "h": ("output h_t", (-1, 1)),
    "z": ("update gate z_t", (0, 1)), "r": ("reset gate r_t", (0, 1)), "h_tilde": ("candidate h̃_t", (-1, 1)),
}


def recurrent_layers(model: torch.nn.Module) -> dict[str, RNN]:
    """Every recurrent layer inside `model` by its name (its module path when names repeat)."""
    found = [(path, module) for path, module in model.named_modules() if isinstance(module, RNN)]
    names = [getattr(module, "name", None) or path for path, module in found]
    unique = len(set(names)) == len(names)
    return {(name if unique else path or name): module for name, (path, module) in zip(names, found)}


@contextlib.contextmanager
def recording_gates(model: torch.nn.Module) -> Iterator[dict]:
    recurrent = recurrent_layers(model)
    if not recurrent:
        raise ValueError(f"model: {type(model).__name__} has no recurrent layer (LSTM, GRU, SimpleRNN) to trace")
    saved = {name: (layer.record_gates, layer.last_gates) for name, layer in recurrent.items()}
    traces: dict = {}
    for layer in recurrent.values():
        layer.record_gates = True
        layer.last_gates = None
    try:
        yield traces
    finally:
        for name, layer in recurrent.items():
            if layer.last_gates is not None:
                traces[name] = {key: value.detach() for key, value in layer.last_gates.items()}
            layer.record_gates, layer.last_gates = saved[name]


def plot_trace(trace: dict, path, title: str, step_labels: Optional[list] = None, example: int = 0,
               max_units: int = 32) -> None:
    """One heat map per internal (units × steps) of one example."""
    keys = [key for key in KEYS if key in trace]
    steps = trace[keys[0]].shape[1]
    units = min(trace[keys[0]].shape[2], max_units)
    width = min(12.0, max(7.0, 4.0 + 0.1 * steps))
    figure = new_figure(width, 1.3 + (0.35 + 0.03 * units) * len(keys))
    axes = np.atleast_1d(figure.subplots(len(keys), 1, sharex=True))
    for axis, key in zip(axes, keys):
        values = trace[key][example, :, :units].T.numpy()
        limits = KEYS[key][1] or (-np.abs(values).max() or -1.0, np.abs(values).max() or 1.0)
        image = axis.imshow(values, aspect="auto", interpolation="nearest", vmin=limits[0], vmax=limits[1],
                            cmap="viridis" if limits == (0, 1) else "RdBu_r")
        axis.set_ylabel(KEYS[key][0], fontsize=8, rotation=0, ha="right", va="center")
        axis.set_yticks([])
        figure.colorbar(image, ax=axis, pad=0.01, aspect=8)
    if step_labels is not None:
        shown = [(t, label) for t, label in enumerate(step_labels) if label]
        axes[-1].set_xticks([t for t, _ in shown], [label for _, label in shown], rotation=90, fontsize=7)
    axes[-1].set_xlabel("step")
    title += f" (first {units} units)" if units < trace[keys[0]].shape[2] else ""
    figure.suptitle(_wrapped(title, width), fontsize=10)
    save(figure, path)


def plot_gate_means(trace: dict, path, title: str, step_labels: Optional[list] = None, example: int = 0) -> None:
    """The mean over units of each gate per step: how open the gates are, at a glance."""
    gates = [key for key in ("i", "f", "o", "z", "r") if key in trace]
    width = min(12.0, max(7.0, 4.0 + 0.1 * trace[gates[0]].shape[1]))
    figure = new_figure(width, 3.0)
    axis = figure.subplots()
    for key in gates:
        axis.plot(trace[key][example].mean(-1).numpy(), lw=1.8, label=KEYS[key][0])
    axis.set_ylim(-0.02, 1.02)
    axis.set_ylabel("mean over units")
    if step_labels is not None:
        shown = [(t, label) for t, label in enumerate(step_labels) if label]
        axis.set_xticks([t for t, _ in shown], [label for _, label in shown], rotation=90, fontsize=7)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=len(gates))
    axis.set_title(_wrapped(title, width), fontsize=10)
    save(figure, path)


def _wrapped(title: str, width: float) -> str:
    """Titles broken into lines that fit a figure `width` inches wide (about 13 characters an inch);
    the title's own line breaks are kept."""
    return "\n".join(line for part in title.split("\n") for line in textwrap.wrap(part, int(width * 13)))
