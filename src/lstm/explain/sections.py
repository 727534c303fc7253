"""The three parts of `lstm explain` (gates, gradients, memory): each runs its measurements, draws
its figures into the output folder and returns a report `Section` whose text quotes the numbers
it just measured."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import gate_table, gradients, memory
from .drawing import draw_cell
from .report import Section, figure_link, markdown_table
from .runs import trace_run
from .traces import plot_gate_means, plot_trace, recording_gates
from .training import BASELINE_ERROR, CELL_NAMES, ERROR_NAME, Budget, examples, trained


@dataclass(frozen=True)
class Settings:
    budgets: dict  # task -> Budget, the same for every cell
    lengths: dict  # task -> [T, ...] of the memory table
    gradient_length: int  # T of the adding models whose gradients (and gates) are measured
    jacobian_steps: int = 100
    radii: tuple = (0.9, 1.0, 1.1)
    clip_length: int = 50
    clip_steps: int = 150
    cells: tuple = tuple(CELL_NAMES)
    label: str = field(default="full", compare=False)


FULL = Settings(budgets={"adding": Budget(steps=2000), "copy": Budget(steps=1500)},
                lengths={"adding": [10, 20, 50, 100, 200, 400], "copy": [10, 20, 50, 100, 200, 400]},
                gradient_length=100)
QUICK = Settings(budgets={"adding": Budget(steps=30, batch_size=16, units=8, test_size=250),
                          "copy": Budget(steps=20, batch_size=16, units=8, test_size=250)},
                 lengths={"adding": [10, 20], "copy": [5, 10]}, gradient_length=20, jacobian_steps=30,
                 clip_steps=30, label="quick")


def _timed(build):
    """The section's wall time goes into the report beside it."""
    @functools.wraps(build)
    def run(*args, **kwargs) -> Section:
        started = time.time()
        section = build(*args, **kwargs)
        section.seconds = time.time() - started
        return section

    return run


# ---------------------------------------------------------------------------------------------- gates

@_timed
def gates_section(out: Path, settings: Settings, run: Optional[str] = None, text: Optional[str] = None,
          seed: int = 0, log=print) -> Section:
    """The cell drawn, the gate table on a forced cell, and the gates of one input on a trained model
    (the `--run` given, else the LSTM this run trains on the adding problem)."""
    out = Path(out)
    traced = _trained_run_gates(out, run, text, seed) if run else _adding_gates(out, settings, seed)
    draw_cell(out / "lstm_cell.png")
    batch, units = 16, 3
    exact = gate_table.run_table("hard_sigmoid", units, batch)
    approximate = gate_table.run_table("sigmoid", units, batch)
    gate_table.plot_table(exact, out / "gate_table.png")
    gate_table.plot_story(gate_table.run_story(), out / "gate_table_story.png")
    rows = [[row.input_gate, row.forget_gate, row.behaviour, f"`{row.formula}`",
             f"{row.example[0]:+.4f}", f"{row.example[1]:+.4f}", f"{row.example[2]:+.4f}",
             f"{row.max_error:.1e}", f"{sigmoid_row.max_error:.1e}",
             f"{sigmoid_row.gates_seen[1]:.3g}, {sigmoid_row.gates_seen[3]:.3g}"]
            for row, sigmoid_row in zip(exact, approximate)]
    table = markdown_table(["i", "f", "behaviour (the tutorial's table)", "C_t must be", "C_{t-1}", "C̃_t", "C_t",
                            "max error, hard_sigmoid", "max error, sigmoid", "sigmoid's i, f (largest)"], rows)
    log("The tutorial's gate table on a real LSTM (C_t after step 2 of 2; max error over every sequence and unit):")
    log(table)
    markdown = "\n\n".join([
        figure_link("lstm_cell.png", "the LSTM cell"),
        "### The gate table on a real cell",
        "An `LSTM` layer whose input and forget gates are switched by the input itself (zero recurrent "
        "kernel, gate pre-activations ±S; see `lstm/explain/gate_table.py`) runs two steps: step 1 writes a "
        f"random value, step 2 applies the row's gates. The error is max |C_t − formula| over {batch} sequences "
        f"× {units} units. With `recurrent_activation='hard_sigmoid'` (exactly 0 below −3, 1 above +3; S = 6) the gates "
        "are exactly 0 and 1 and every row holds to the last bit; with the default sigmoid (S = 20) the gates "
        "are 0 only within σ(−20) ≈ 2e-9, and so is the error.",
        table,
        figure_link("gate_table.png", "the gate table, one example per row"),
        "The four rows in one sequence, the input and forget gates driven by the input at each step:",
        figure_link("gate_table_story.png", "the gate table over a sequence"),
        traced["markdown"],
    ])
    numbers = {"table": {"hard_sigmoid": [vars(r) for r in exact], "sigmoid": [vars(r) for r in approximate]},
               "traces": traced["numbers"]}
    return Section("gates", "Gate traces and the gate table", markdown, numbers,
                   ["lstm_cell.png", "gate_table.png", "gate_table_story.png", *traced["figures"]])


def _adding_gates(out: Path, settings: Settings, seed: int) -> dict:
    model = trained("lstm", "adding", settings.gradient_length, settings.budgets["adding"])
    x, y = examples("adding", model.length, 1, torch.Generator().manual_seed(seed + 3))
    with recording_gates(model.model) as traces, torch.no_grad():
        answer = model.model(x).item()
    trace = traces["lstm"]
    marked = x[0, :, 1] > 0
    labels = [f"{v:.2f} ▲" if m else "" for v, m in zip(x[0, :, 0].tolist(), marked.tolist())]
    title = (f"LSTM trained on the adding problem (T = {model.length}, test MSE {model.test_error:.4f})\n"
             f"marked values (▲) sum to {y.item():.3f}, the model says {answer:.3f}")
    plot_trace(trace, out / "gates_adding.png", title, labels)
    plot_gate_means(trace, out / "gates_adding_means.png", "Mean gate values per step (▲: marked steps)", labels)
    mean = {key: (float(trace[key][0, marked].mean()), float(trace[key][0, ~marked].mean())) for key in "ifo"}
    markdown = "\n\n".join([
        "### Gate traces of a trained LSTM",
        f"`with recording_gates(model) as traces: model(x)` on the LSTM trained below on the adding problem "
        f"(T = {model.length}, test MSE {model.test_error:.4f}), for one sequence. The two marked steps "
        "(▲) carry the values to add.",
        markdown_table(["gate", "mean at the 2 marked steps", f"mean at the other {int((~marked).sum())} steps"],
                       [[name, f"{mean[key][0]:.3f}", f"{mean[key][1]:.3f}"]
                        for key, name in (("i", "input gate i_t"), ("f", "forget gate f_t"),
                                          ("o", "output gate o_t"))]),
        figure_link("gates_adding.png", "gates of the adding LSTM"),
        figure_link("gates_adding_means.png", "mean gates per step"),
    ])
    return {"markdown": markdown, "figures": ["gates_adding.png", "gates_adding_means.png"],
            "numbers": {"source": "adding", "test_mse": model.test_error, "target": y.item(), "answer": answer,
                        "mean_at_marked_and_other_steps": mean}}


def _trained_run_gates(out: Path, run: str, text: Optional[str], seed: int) -> dict:
    traced = trace_run(run, text, seed)
    parts = ["### Gate traces of a trained model",
             f"`{traced.checkpoint}` ({traced.task}): {traced.description}"]
    figures, numbers = [], {"source": traced.checkpoint, "task": traced.task, "description": traced.description,
                            "layers": {}}
    for name, trace in traced.traces.items():
        file = f"gates_{name}.png"
        plot_trace(trace, out / file, f"{name}: {traced.description}", traced.step_labels)
        means = f"gate_means_{name}.png"
        plot_gate_means(trace, out / means, f"{name}: mean gate values per step", traced.step_labels)
        figures += [file, means]
        numbers["layers"][name] = {key: float(value.mean()) for key, value in trace.items()}
        parts += [figure_link(file, f"gates of {name}"), figure_link(means, f"mean gates of {name}")]
    return {"markdown": "\n\n".join(parts), "figures": figures, "numbers": numbers}


# ------------------------------------------------------------------------------------------ gradients

@_timed
def gradients_section(out: Path, settings: Settings, log=print) -> Section:
    """‖∂L/∂h_t‖ and ‖∂L/∂C_t‖ against the distance from the loss; ‖∏J‖ against ρ^k; clipping."""
    out = Path(out)
    models = [trained(cell, "adding", settings.gradient_length, settings.budgets["adding"])
              for cell in ("simple_rnn", "lstm")]
    found = gradients.profiles(models)
    gradients.plot_profiles(found, out / "gradients.png")
    length = settings.gradient_length
    distances = sorted({0, min(10, length - 1), length // 2, length - 1})
    rows = []
    test_errors = {model.cell: model.test_error for model in models}
    for profile in found:
        for key in profile.norms:
            rows.append([CELL_NAMES[profile.cell] + (" C_t" if key == "c" else " h_t"), profile.when,
                         *[f"{profile.at_distance(key, d):.2e}" for d in distances],
                         f"{profile.decay_per_step(key):.3f}",
                         f"{test_errors[profile.cell]:.4f}" if profile.when == "after training" else "—"])
    log("  gradients: " + ", ".join(f"{CELL_NAMES[p.cell]} {p.when} decay/step {p.decay_per_step('h'):.3f}"
                                    for p in found))
    profile_table = markdown_table(["state", "model", *[f"‖∂L/∂·‖ at distance {d}" for d in distances],
                                    "mean factor per step back", "test MSE"], rows)

    measured = {(radius, activation): gradients.jacobian_product_norms(radius, activation, steps=settings.jacobian_steps)
                for radius in settings.radii for activation in ("linear", "tanh")}
    gradients.plot_jacobians(measured, out / "jacobians.png")
    ks = sorted({1, min(10, settings.jacobian_steps), settings.jacobian_steps // 2, settings.jacobian_steps})
    jacobian_rows = [[radius, activation, *[f"{norms[k - 1]:.3e}" for k in ks],
                      f"{radius ** ks[-1]:.3e}", f"{norms[-1] / radius ** ks[-1]:.3g}"]
                     for (radius, activation), norms in measured.items()]
    jacobian_table = markdown_table(["ρ", "activation", *[f"‖∏J‖ at k = {k}" for k in ks], f"ρ^{ks[-1]}",
                                     "measured / ρ^k"], jacobian_rows)

    clipping = [gradients.clipping_run(clip, settings.clip_length, settings.clip_steps) for clip in (None, 1.0)]
    gradients.plot_clipping(clipping, out / "clipping.png")
    clip_rows = [["none" if run.clip is None else f"clip_grad_norm_(max_norm={run.clip})",
                  len(run.losses), run.diverged_at or "never", f"{max(run.gradient_norms):.3g}",
                  f"{run.losses[-1]:.4f}", f"{np.mean(run.losses[-10:]):.4f}"] for run in clipping]
    clip_table = markdown_table(["clipping", "finite updates", "loss not finite at update", "largest gradient norm",
                                 "last finite loss", "mean of the last 10 losses"], clip_rows)
    markdown = "\n\n".join([
        "The tutorial: an RNN multiplies Jacobians step after step, so gradients vanish or explode. Measured "
        "with autograd on this library's layers.",
        "### ‖∂L/∂h_t‖ against the distance from the loss",
        f"Adding problem, T = {length}, loss on the last step; the mean over 64 sequences of the total derivative "
        "of each sequence's loss with respect to its state at step t (a zero probe added to the state after each "
        "step of the layer's own cell; ∂L/∂probe_t is the derivative through every later step). Models: the "
        "SimpleRNN and LSTM of the memory table (their initialization and after training). 'Mean factor per step "
        "back' = (‖g‖ at distance T−1 / ‖g‖ at distance 1)^(1/(T−2)); ∂L/∂C_T is 0 (no step follows to read it).",
        profile_table,
        figure_link("gradients.png", "gradient norms against distance"),
        "### The product of step Jacobians against theory",
        "A SimpleRNN (32 units, no bias) whose recurrent matrix is ρ·Q, Q orthogonal, so every eigenvalue has "
        "modulus ρ; inputs N(0, 1). ‖∂h_k/∂h_0‖₂ = ‖J_k ⋯ J_1‖₂ by autograd through the layer. Linear "
        "activation: J = (ρQ)ᵀ and theory says exactly ρ^k. tanh: J_t = diag(1 − h_t²)(ρQ)ᵀ, at most ρ^k: "
        "saturation shrinks every step's Jacobian.",
        jacobian_table,
        figure_link("jacobians.png", "Jacobian product norms"),
        "### Gradient clipping on an exploding run",
        f"A ReLU SimpleRNN with recurrent matrix 1.5·Q (gradients grow like 1.5^T) on the adding problem, "
        f"T = {settings.clip_length}, plain SGD (lr 0.05, batch 32), the same initial weights and batches, "
        f"{settings.clip_steps} updates at most.",
        clip_table,
        figure_link("clipping.png", "loss with and without clipping"),
    ])
    numbers = {
        "profiles": [{"cell": p.cell, "when": p.when, "norms": {k: v.tolist() for k, v in p.norms.items()},
                      "decay_per_step": {k: p.decay_per_step(k) for k in p.norms}} for p in found],
        "jacobians": [{"radius": r, "activation": a, "norms": n.tolist(), "theory_at_last_k": r ** len(n)}
                      for (r, a), n in measured.items()],
        "clipping": [vars(run) for run in clipping],
    }
    return Section("gradients", "Vanishing and exploding gradients", markdown, numbers,
                   ["gradients.png", "jacobians.png", "clipping.png"])


# --------------------------------------------------------------------------------------------- memory

@_timed
def memory_section(out: Path, settings: Settings, log=print) -> Section:
    """LSTM vs GRU vs SimpleRNN, same budget, adding and copy at growing T."""
    out = Path(out)
    results = memory.run_grid(settings.lengths, settings.budgets, settings.cells, log)
    memory.plot_errors(results, out / "memory.png")
    memory.plot_curves(results, out / "memory_curves.png")
    clips = sorted({budget.clip for budget in settings.budgets.values()})
    parts = ["The long-memory tasks of Hochreiter & Schmidhuber (1997), each cell trained with the same budget "
             f"(Adam, warm-up and cosine decay, gradients clipped at norm {', '.join(map(str, clips))}, a fresh "
             f"batch per update; the test error is on {' / '.join(sorted({str(b.test_size) for b in settings.budgets.values()}))} "
             "other sequences, drawn from their own seed).",
             "- **adding**: a sequence of T (value, marker) pairs, two marked; predict the sum of the two marked "
             "values. Predicting the mean gives MSE 1/6 ≈ 0.167; the literature's bar for solved is MSE < 0.01.",
             "- **copy**: 10 symbols (of 8 kinds), then T blank steps (the last one a 'go' marker), then repeat "
             "the 10 symbols: T is the delay. Guessing gets 7/8 of the copied symbols wrong; solved: < 1% wrong."]
    for task, budget in settings.budgets.items():
        rows = [r for r in results if r.task == task]
        if not rows:
            continue
        cells = list(dict.fromkeys(r.cell for r in rows))
        parameters = ", ".join(f"{CELL_NAMES[c]} {next(r.parameters for r in rows if r.cell == c):,}" for c in cells)
        table = markdown_table(["T", *[CELL_NAMES[c] for c in cells], "memoryless baseline"], [
            [length, *[_error_cell(next(r for r in rows if r.cell == c and r.length == length)) for c in cells],
             f"{BASELINE_ERROR[task]:.3f}"] for length in settings.lengths[task]])
        solved_up_to = {CELL_NAMES[c]: max([r.length for r in rows if r.cell == c and memory.solved(r)], default=None)
                        for c in cells}
        parts += [f"### {task}: {ERROR_NAME[task]}",
                  f"Budget: {budget.steps} updates of batch {budget.batch_size}, {budget.units} units, peak lr "
                  f"{budget.lr}; parameters: {parameters}. Bold: solved (error < 0.01).",
                  table,
                  "Largest T solved: " + ", ".join(f"{name} {'T = ' + str(t) if t else 'none'}"
                                                  for name, t in solved_up_to.items()) + "."]
    total = sum(r.seconds for r in results)
    parts += [figure_link("memory.png", "final test error against T"),
              "Training loss per update (the plateau at the baseline is the model not yet finding the marked "
              "steps or the symbols):", figure_link("memory_curves.png", "learning curves"),
              f"Training time, all {len(results)} models: {total:.0f} s."]
    numbers = {"runs": [{"cell": r.cell, "task": r.task, "T": r.length, "test_error": r.test_error,
                         "parameters": r.parameters, "seconds": r.seconds, "budget": vars(r.budget),
                         "curve": r.curve} for r in results]}
    return Section("memory", "Long memory: adding and copy against T", "\n\n".join(parts), numbers,
                   ["memory.png", "memory_curves.png"])


def _error_cell(result) -> str:
    text = f"{result.test_error:.4f}"
    return f"**{text}**" if memory.solved(result) else text
