"""The tutorial's gate table, run on a real LSTM layer with its input and forget gates forced.

The layer reads x_t = [value, input flag, forget flag]. Its weights make each gate a switch: the
flag's kernel weight 2S and the bias -S give the pre-activation +S (flag 1) or -S (flag 0);
the output gate's bias is +S (always open); the candidate is C̃_t = tanh(w_u * value); the
recurrent kernel is zero, so h_{t-1} cannot move a gate. With hard_sigmoid (exactly 0 below -3
and 1 above +3) and S = 6 the gates are exactly 0 and 1, so each row's C_t equals the tutorial's
formula to the last bit; with the sigmoid (S = 20) they are 0/1 only within ~2e-9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import layers
from .figures import new_figure, save

# (input gate, forget gate, the tutorial's words, what C_t must be)
ROWS = (
    (0, 1, "memory only (只是用记忆)", "C_{t-1}"),
    (1, 1, "input and memory combined (综合输入和记忆)", "C_{t-1} + C̃_t"),
    (0, 0, "memory cleared (清零记忆)", "0"),
    (1, 0, "input overwrites memory (输入覆盖记忆)", "C̃_t"),
)
SATURATION = {"hard_sigmoid": 6.0, "sigmoid": 20.0}


def switched_lstm(units: int, recurrent_activation: str = "hard_sigmoid") -> layers.LSTM:
    """An LSTM whose input and forget gates are the input's flags (see the module docstring)."""
    if recurrent_activation not in SATURATION:
        raise ValueError(f"recurrent_activation: expected one of {list(SATURATION)}, got {recurrent_activation!r}")
    s = SATURATION[recurrent_activation]
    layer = layers.LSTM(units, input_dim=3, recurrent_activation=recurrent_activation, return_sequences=True)
    kernel = np.zeros((3, 4 * units), np.float32)
    bias = np.zeros(4 * units, np.float32)
    gate = {name: slice(k * units, (k + 1) * units) for k, name in enumerate("ifco")}  # Keras' block order
    kernel[1, gate["i"]], bias[gate["i"]] = 2 * s, -s
    kernel[2, gate["f"]], bias[gate["f"]] = 2 * s, -s
    kernel[0, gate["c"]] = np.linspace(1.0, 2.0, units)
    bias[gate["o"]] = s
    layer.set_weights([kernel, np.zeros((units, 4 * units), np.float32), bias])
    return layer


def flagged_inputs(values, input_flags, forget_flags) -> torch.Tensor:
    """[B, T, 3] from per-step values and gate flags, each [B, T]."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in (values, input_flags, forget_flags)], -1)


@dataclass
class Row:
    input_gate: int
    forget_gate: int
    behaviour: str
    formula: str
    gates_seen: tuple  # (min i, max i, min f, max f) the layer computed at step t
    example: tuple  # (C_{t-1}, C̃_t, C_t) of the first sequence's first unit
    max_error: float  # max |C_t - formula| over every sequence and unit


EXAMPLE = (0.6, 0.4)  # the first sequence's two values in every row: same C_{t-1} and C̃_t, different gates


def run_table(recurrent_activation: str = "hard_sigmoid", units: int = 3, batch: int = 16,
              seed: int = 0) -> list[Row]:
    """Each row on `batch` sequences of two steps: step 1 writes a random value (i = 1, f = 0),
    step 2 applies the row's gates to another; C_t of step 2 is checked against the formula."""
    generator = torch.Generator().manual_seed(seed)
    layer = switched_lstm(units, recurrent_activation)
    rows = []
    for input_gate, forget_gate, behaviour, formula in ROWS:
        values = torch.rand(batch, 2, generator=generator) * 2 - 1
        values[0] = torch.tensor(EXAMPLE)
        x = flagged_inputs(values, torch.tensor([[1.0, input_gate]]).expand(batch, 2),
                           torch.tensor([[0.0, forget_gate]]).expand(batch, 2))
        with torch.no_grad():
            _, gates = layer(x, return_gates=True)
        c_prev, c_tilde, c_t = gates["c"][:, 0], gates["c_tilde"][:, 1], gates["c"][:, 1]
        expected = {"C_{t-1}": c_prev, "C_{t-1} + C̃_t": c_prev + c_tilde, "0": torch.zeros_like(c_t),
                    "C̃_t": c_tilde}[formula]
        seen = torch.stack([gates["i"][:, 1], gates["f"][:, 1]])
        rows.append(Row(input_gate, forget_gate, behaviour, formula,
                        (float(seen[0].min()), float(seen[0].max()), float(seen[1].min()), float(seen[1].max())),
                        (float(c_prev[0, 0]), float(c_tilde[0, 0]), float(c_t[0, 0])),
                        float((c_t - expected).abs().max())))
    return rows


# A story through the four rows on one unit: (value, input flag, forget flag, label)
STORY = ((0.8, 1, 0, "write"), (0.0, 0, 1, "keep"), (-0.3, 0, 1, "keep"), (0.9, 0, 1, "keep"),
         (0.5, 1, 1, "add"), (0.0, 0, 1, "keep"), (-0.7, 1, 0, "overwrite"), (0.2, 0, 1, "keep"),
         (0.6, 0, 0, "clear"), (0.4, 0, 1, "keep"))


def run_story(recurrent_activation: str = "hard_sigmoid") -> dict:
    """The gates and C of a one-unit switched LSTM over STORY (each [T] as lists)."""
    values, input_flags, forget_flags, _ = zip(*STORY)
    layer = switched_lstm(1, recurrent_activation)
    with torch.no_grad():
        _, gates = layer(flagged_inputs([values], [input_flags], [forget_flags]), return_gates=True)
    return {key: gates[key][0, :, 0].tolist() for key in ("i", "f", "c_tilde", "c")}


_ROW_COLOURS = {(0, 1): "#dbe9f6", (1, 1): "#dff2df", (0, 0): "#f6dede", (1, 0): "#fbefd5"}


def plot_story(story: dict, path) -> None:
    figure = new_figure(8.5, 4.6)
    gates_axis, cell_axis = figure.subplots(2, 1, sharex=True, height_ratios=[1, 2])
    steps = np.arange(1, len(STORY) + 1)
    for axis in (gates_axis, cell_axis):
        for step, (_, i_flag, f_flag, _) in zip(steps, STORY):
            axis.axvspan(step - 0.5, step + 0.5, color=_ROW_COLOURS[(i_flag, f_flag)], lw=0)
    gates_axis.step(steps, story["i"], where="mid", label="input gate i_t", lw=2)
    gates_axis.step(steps, np.asarray(story["f"]) + 0.04, where="mid", label="forget gate f_t (+0.04 to show)",
                    lw=2, ls="--")
    gates_axis.set_ylim(-0.15, 1.25)
    gates_axis.set_yticks([0, 1])
    gates_axis.legend(loc="upper right", fontsize=8, ncol=2)
    gates_axis.set_title("The tutorial's gate table on a real LSTM: input/forget gates forced to 0 or 1")
    cell_axis.plot(steps, story["c"], "o-", color="black", label="cell state C_t", lw=2)
    cell_axis.bar(steps, story["c_tilde"], width=0.35, alpha=0.6, label="candidate C̃_t")
    cell_axis.axhline(0, color="grey", lw=0.5)
    cell_axis.set_xticks(steps, [f"{t}\n{label}" for t, (*_, label) in zip(steps, STORY)], fontsize=8)
    cell_axis.set_xlabel("step (blue: memory only, green: input + memory, red: clear, yellow: overwrite)")
    cell_axis.legend(loc="lower left", fontsize=8)
    save(figure, path)


def plot_table(rows: list[Row], path) -> None:
    """The table as a picture: per row, C_{t-1}, C̃_t and C_t of the first example as bars."""
    figure = new_figure(10.0, 3.0)
    axes = figure.subplots(1, len(rows), sharey=True)
    for axis, row in zip(axes, rows):
        axis.bar([r"$C_{t-1}$", r"$\tilde{C}_t$", r"$C_t$"], row.example, color=["#7f7f7f", "#1f77b4", "black"])
        axis.axhline(0, color="grey", lw=0.5)
        formula = row.formula.replace("C̃_t", r"\tilde{C}_t")
        axis.set_title(f"$i_t$ = {row.input_gate}, $f_t$ = {row.forget_gate}: {row.behaviour.split(' (')[0]}\n"
                       f"$C_t = {formula}$", fontsize=8)
        axis.tick_params(labelsize=8)
    save(figure, path)
