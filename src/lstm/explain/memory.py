"""Long memory, measured: SimpleRNN, GRU and LSTM on the adding problem and the copy task at
growing T, each trained with the same budget (updates, batch, hidden size, learning rate)."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import LogFormatter

from .figures import new_figure, save
from .training import BASELINE_ERROR, CELL_NAMES, ERROR_NAME, TASKS, TrainedModel, trained

COLOURS = {"simple_rnn": "#d62728", "gru": "#2ca02c", "lstm": "#1f77b4"}


def run_grid(lengths: dict, budgets: dict, cells=tuple(CELL_NAMES), log=print) -> list[TrainedModel]:
    """Every cell on every task in `lengths` ({task: [T, ...]}) with that task's budget."""
    results = []
    total = sum(len(task_lengths) for task_lengths in lengths.values()) * len(cells)  # models, for "n/total"
    for task, task_lengths in lengths.items():
        if task not in TASKS:
            raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
        for length in task_lengths:
            for cell in cells:
                result = trained(cell, task, length, budgets[task])
                results.append(result)
                log(f"  memory {len(results)}/{total}: {task:<6} T={length:<4} {CELL_NAMES[cell]:<9} "
                    f"{ERROR_NAME[task]} {result.test_error:.4f}  ({result.seconds:.0f} s)")
    return results


SOLVED_BELOW = 0.01  # the literature's bar for adding (MSE, against ~0.167 for the mean); copy: 1% wrong


def solved(result: TrainedModel) -> bool:
    return result.test_error < SOLVED_BELOW


def plot_errors(results: list[TrainedModel], path) -> None:
    tasks = list(dict.fromkeys(r.task for r in results))
    figure = new_figure(4.6 * len(tasks), 3.8)
    axes = np.atleast_1d(figure.subplots(1, len(tasks)))
    for axis, task in zip(axes, tasks):
        rows = [r for r in results if r.task == task]
        lengths = sorted({r.length for r in rows})
        for cell in dict.fromkeys(r.cell for r in rows):
            errors = [next(r.test_error for r in rows if r.cell == cell and r.length == t) for t in lengths]
            axis.semilogy(lengths, np.maximum(errors, 1e-6), "o-", color=COLOURS[cell], lw=2, label=CELL_NAMES[cell])
        axis.axhline(BASELINE_ERROR[task], color="grey", ls="--", lw=1,
                     label="predict the mean" if task == "adding" else "guess (7/8 wrong)")
        axis.axhline(SOLVED_BELOW, color="black", ls=":", lw=1, label=f"solved (< {SOLVED_BELOW})")
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(t) for t in lengths])
        axis.set_xlabel("T (sequence length)" if task == "adding" else "T (delay: blank steps to remember over)")
        axis.set_ylabel(ERROR_NAME[task] + " (log)")
        axis.set_title(f"{task}: final test error against T")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    save(figure, path)


def plot_curves(results: list[TrainedModel], path) -> None:
    """Training loss against updates, one panel per (task, T): the plateau before memory is found."""
    panels = list(dict.fromkeys((r.task, r.length) for r in results))
    tasks = list(dict.fromkeys(task for task, _ in panels))
    columns = max(sum(1 for task, _ in panels if task == t) for t in tasks)
    figure = new_figure(2.6 * columns, 2.3 * len(tasks))
    axes = np.atleast_2d(figure.subplots(len(tasks), columns, squeeze=False))
    for row, task in enumerate(tasks):
        lengths = [length for t, length in panels if t == task]
        for column, length in enumerate(lengths):
            axis = axes[row, column]
            for r in results:
                if r.task == task and r.length == length and r.curve:
                    steps, loss = zip(*r.curve)
                    axis.semilogy(steps, loss, color=COLOURS[r.cell], label=CELL_NAMES[r.cell])
            axis.set_title(f"{task}, T = {length}", fontsize=9)
            # plain numbers ("2.05", "0.001"): a panel may span less than a decade of loss
            for formatter in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
                formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
            axis.tick_params(which="both", labelsize=7)
            axis.grid(alpha=0.3, which="both")
        for column in range(len(lengths), columns):
            axes[row, column].axis("off")
    axes[0, 0].legend(fontsize=7)
    figure.supxlabel("update", fontsize=9)
    figure.supylabel("training loss (log)", fontsize=9)
    save(figure, path)
