"""Vanishing and exploding gradients, measured with autograd on the real layers.

Three measurements:
  state_gradient_norms      ‖∂L/∂h_t‖ (and ‖∂L/∂C_t‖) against the distance from a loss on the last
                            step: the total derivative through the recurrence, as BPTT sees it
  jacobian_product_norms    ‖∂h_k/∂h_0‖ = ‖J_k ⋯ J_1‖ of a SimpleRNN whose recurrent matrix is an
                            orthogonal matrix times ρ: below 1 it vanishes, above it explodes (ρ^k)
  clipping_run              an exploding SimpleRNN trained with or without clip_grad_norm_
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import layers
from ..models import Sequential
from .figures import new_figure, save
from .training import CELL_NAMES, TrainedModel, build_model, examples


def state_gradient_norms(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean over the batch of ‖∂ℓ/∂h_t‖ (and ‖∂ℓ/∂C_t‖), t = 1..T, for an adding model
    (recurrent layer -> Dense(1), squared error of the last output).

    The layer's own cell runs the sequence step by step (the same weights and kernels) and a zero
    probe is added to each state: ∂ℓ/∂probe_t is the total derivative of the loss with respect to
    that state, through every later step. Per-example losses are summed, so each example's
    gradient is its own."""
    recurrent, head = model[0], model[1]
    cell = recurrent.cell
    states = cell.get_initial_state(x.shape[0])
    probes = []
    for t in range(x.shape[1]):
        _, states = cell(x[:, t], states, training=False)
        step_probes = [torch.zeros_like(s, requires_grad=True) for s in states]
        states = [s + p for s, p in zip(states, step_probes)]
        probes.append(step_probes)
    loss = ((head(states[0]) - y) ** 2).sum()
    # no later step reads C_T and the loss reads h_T only: its gradient is zero, not missing
    grads = torch.autograd.grad(loss, [p for step in probes for p in step], materialize_grads=True)
    count = len(probes[0])  # states per step: (h, C) or (h,)
    return {key: np.array([grads[t * count + k].norm(dim=1).mean().item() for t in range(len(probes))])
            for k, key in enumerate(("h", "c")[:count])}


@dataclass
class GradientProfile:
    cell: str
    when: str  # "at initialization" or "after training"
    norms: dict  # "h" (and "c"): [T] with index 0 the step farthest from the loss

    def at_distance(self, key: str, distance: int) -> float:
        return float(self.norms[key][len(self.norms[key]) - 1 - distance])

    def decay_per_step(self, key: str) -> float:
        """(‖g‖ at distance T-1 / ‖g‖ at distance 1)^(1 / (T - 2)): the mean factor per step back
        (from distance 1: at distance 0, ∂L/∂C_T is 0, as no step follows to read C_T)."""
        values = self.norms[key]
        return float((values[0] / values[-2]) ** (1.0 / (len(values) - 2)))


def profiles(trained: list[TrainedModel], batch: int = 64, seed: int = 0) -> list[GradientProfile]:
    """For each trained adding model: the profile of a fresh model of the same cell (its seed's
    initialization) and of the trained one, on the same batch."""
    result = []
    for run in trained:
        x, y = examples("adding", run.length, batch, torch.Generator().manual_seed(seed + 17))
        fresh = build_model(run.cell, "adding", run.budget.units, run.budget.seed)
        for when, model in (("at initialization", fresh), ("after training", run.model)):
            result.append(GradientProfile(run.cell, when, state_gradient_norms(model, x, y)))
    return result


def plot_profiles(found: list[GradientProfile], path) -> None:
    figure = new_figure(8.0, 4.2)
    axis = figure.subplots()
    colours = {"simple_rnn": "#d62728", "lstm": "#1f77b4", "gru": "#2ca02c"}
    for profile in found:
        for key in profile.norms:
            values = profile.norms[key][::-1]  # index = distance from the loss
            name = CELL_NAMES[profile.cell] + (" ‖∂L/∂C_t‖" if key == "c" else " ‖∂L/∂h_t‖")
            styles = {("h", "after training"): "-", ("h", "at initialization"): "--",
                      ("c", "after training"): "-.", ("c", "at initialization"): ":"}
            positive = values > 0  # a zero gradient (∂L/∂C_T) has no place on a log axis
            axis.semilogy(np.arange(len(values))[positive], values[positive], styles[key, profile.when],
                          color=colours[profile.cell], lw=2 if key == "h" else 1.3, label=f"{name}, {profile.when}")
    axis.set_xlabel("distance from the loss (steps back from the last step)")
    axis.set_ylabel("mean ‖gradient‖ (log scale)")
    axis.set_title("Gradient of the loss with respect to each step's state (adding problem)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    save(figure, path)


# ------------------------------------------------------------------------------------- spectral radius

def scaled_orthogonal(units: int, radius: float, seed: int) -> torch.Tensor:
    """ρ·Q with Q orthogonal: every eigenvalue has modulus ρ and ‖(ρQ)^k‖₂ = ρ^k exactly."""
    gaussian = torch.randn(units, units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (radius * q * torch.sign(torch.diagonal(r))).float()


def jacobian_product_norms(radius: float, activation: str, units: int = 32, steps: int = 100,
                           seed: int = 0) -> np.ndarray:
    """‖∂h_k/∂h_0‖₂ for k = 1..steps through a real SimpleRNN layer (recurrent matrix ρ·Q, inputs
    N(0, 1) through a Glorot kernel, h_0 ~ N(0, 0.1²)).

    Batch trick: `units` copies of the same sequence, copy i's h_k[i] differentiated: one backward
    pass gives every row of ∂h_k/∂h_0 (the copies do not interact)."""
    torch.manual_seed(seed)
    layer = layers.SimpleRNN(units, activation=activation, use_bias=False, return_sequences=True, input_dim=4)
    with torch.no_grad():
        layer.cell.recurrent_kernel.copy_(scaled_orthogonal(units, radius, seed))
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, steps, 4, generator=generator).expand(units, steps, 4)
    h0 = (0.1 * torch.randn(1, units, generator=generator)).expand(units, units).clone().requires_grad_(True)
    outputs = layer(x, initial_state=[h0], training=False)
    norms = []
    for k in range(steps):
        (jacobian,) = torch.autograd.grad(outputs[:, k].diagonal().sum(), h0, retain_graph=k < steps - 1)
        norms.append(torch.linalg.matrix_norm(jacobian.double(), ord=2).item())
    return np.array(norms)


def plot_jacobians(measured: dict, path) -> None:
    """`measured`: {(radius, activation): norms [k]}."""
    figure = new_figure(8.0, 4.2)
    axis = figure.subplots()
    colours = {}
    for (radius, activation), norms in measured.items():
        k = np.arange(1, len(norms) + 1)
        colour = colours.setdefault(radius, "#d62728" if radius > 1 else "#1f77b4" if radius < 1 else "#555555")
        axis.semilogy(k, norms, "-" if activation == "linear" else "-.", color=colour, lw=2,
                      label=f"measured, ρ = {radius}, {activation}")
        if activation == "linear":
            axis.semilogy(k, radius ** k, ":", color="black", lw=1)
    axis.plot([], [], ":", color="black", lw=1, label="theory ρ^k")
    axis.set_xlabel("k (steps)")
    axis.set_ylabel("‖∂h_k/∂h_0‖₂ = ‖J_k ⋯ J_1‖₂ (log scale)")
    axis.set_title("SimpleRNN: the product of step Jacobians vanishes (ρ < 1) or explodes (ρ > 1)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    save(figure, path)


# ------------------------------------------------------------------------------------------- clipping

@dataclass
class ClippingRun:
    clip: float | None
    losses: list  # training loss per update, while finite
    gradient_norms: list  # the gradient norm before clipping, per update, while finite
    diverged_at: int | None  # the first update (from 1) whose loss or gradient is not finite; None: never


def clipping_run(clip: float | None, length: int = 50, steps: int = 150, radius: float = 1.5, units: int = 32,
                 lr: float = 0.05, batch: int = 32, seed: int = 0) -> ClippingRun:
    """A ReLU SimpleRNN (recurrent matrix ρ·Q with ρ > 1, so gradients grow like ρ^T) on the adding
    problem, plain SGD, with clip_grad_norm_(clip) or without. The same seed, so both runs start
    from the same weights and see the same batches."""
    torch.manual_seed(seed)
    model = Sequential([layers.SimpleRNN(units, activation="relu", input_dim=2), layers.Dense(1, input_dim=units)])
    with torch.no_grad():
        model[0].cell.recurrent_kernel.copy_(scaled_orthogonal(units, radius, seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    losses, norms = [], []
    for step in range(steps):
        x, y = examples("adding", length, batch, generator)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            return ClippingRun(clip, losses, norms, step + 1)  # the weights are no longer numbers: stop
        losses.append(loss.item())
        norms.append(norm.item())
        optimizer.step()
    return ClippingRun(clip, losses, norms, None)


def plot_clipping(runs: list[ClippingRun], path) -> None:
    figure = new_figure(9.0, 3.6)
    loss_axis, norm_axis = figure.subplots(1, 2)
    for run in runs:
        label = f"clip_grad_norm_({run.clip})" if run.clip else "no clipping"
        steps = np.arange(1, len(run.losses) + 1)
        loss_axis.semilogy(steps, run.losses, label=label)
        norm_axis.semilogy(steps, run.gradient_norms, label=label)
        if run.diverged_at is not None:
            loss_axis.axvline(run.diverged_at, color="red", ls=":", lw=1)
            loss_axis.text(run.diverged_at, 0.98, f" update {run.diverged_at}:\n loss not finite", color="red",
                           fontsize=8, transform=loss_axis.get_xaxis_transform(), va="top")
    loss_axis.axhline(1 / 6, color="grey", ls="--", lw=1, label="predict the mean (1/6)")
    loss_axis.set_xlabel("update")
    loss_axis.set_ylabel("training MSE (log)")
    norm_axis.set_xlabel("update")
    norm_axis.set_ylabel("gradient norm before clipping (log)")
    for axis in (loss_axis, norm_axis):
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.suptitle("An exploding ReLU SimpleRNN (ρ > 1) on the adding problem, SGD, with and without clipping")
    save(figure, path)
