"""Train SimpleRNN, GRU or LSTM on a long-memory task (adding, copy) under a fixed budget.

Shared by the memory table and the gradient measurements; a model trained once is cached for
the process, so `lstm explain all` trains each (cell, task, T, budget) once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import layers
from ..models import Sequential
from ..train.datasets import synthetic
from ..train.loop import learning_rate

CELLS = {"simple_rnn": layers.SimpleRNN, "gru": layers.GRU, "lstm": layers.LSTM}
CELL_NAMES = {"simple_rnn": "SimpleRNN", "gru": "GRU", "lstm": "LSTM"}
TASKS = ("adding", "copy")
COPY_SYMBOLS, COPY_LENGTH, COPY_EMBEDDING = 8, 10, 16
# the error of a memoryless model: predicting the mean (adding), a uniform guess (copy)
BASELINE_ERROR = {"adding": 1 / 6, "copy": 1 - 1 / COPY_SYMBOLS}
ERROR_NAME = {"adding": "test MSE", "copy": "test error rate of the copied symbols"}


@dataclass(frozen=True)
class Budget:
    """The same for every cell: updates, batch, hidden size, peak learning rate, clipping norm."""

    steps: int
    batch_size: int = 64
    units: int = 32
    lr: float = 1e-2
    clip: float = 1.0
    test_size: int = 1000
    seed: int = 0


@dataclass
class TrainedModel:
    cell: str
    task: str
    length: int
    budget: Budget
    model: Sequential
    parameters: int
    test_error: float
    curve: list = field(default_factory=list)  # (update, mean training loss over the last chunk)
    seconds: float = 0.0

    @property
    def recurrent_layer(self) -> layers.RNN:
        return next(layer for layer in self.model if isinstance(layer, layers.RNN))


def build_model(cell: str, task: str, units: int, seed: int) -> Sequential:
    """adding: RNN -> Dense(1) on the last output; copy: Embedding -> RNN (every step) -> Dense."""
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {list(CELLS)}, got {cell!r}")
    torch.manual_seed(seed)
    recurrent = CELLS[cell]
    if task == "adding":
        return Sequential([recurrent(units, input_dim=2, name=cell), layers.Dense(1, input_dim=units, name="output")])
    if task == "copy":
        vocabulary = COPY_SYMBOLS + 2
        return Sequential([layers.Embedding(vocabulary, COPY_EMBEDDING, name="embedding"),
                           recurrent(units, input_dim=COPY_EMBEDDING, return_sequences=True, name=cell),
                           layers.Dense(vocabulary, input_dim=units, name="output")])
    raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")


def examples(task: str, length: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`length` is the adding problem's sequence length, or the copy task's delay (blank steps)."""
    if task == "adding":
        return synthetic.adding(n, length, generator)
    return synthetic.copy(n, length, generator, COPY_SYMBOLS, COPY_LENGTH)


def losses(task: str, model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example loss, per-example error): squared error for adding; for copy, cross-entropy and
    the wrong fraction over the copied steps only (the rest is blank)."""
    if task == "adding":
        error = ((model(x) - y) ** 2)[:, 0]
        return error, error
    logits = model(x)[:, -COPY_LENGTH:]
    target = y[:, -COPY_LENGTH:]
    loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
    return loss, (logits.argmax(-1) != target).float().mean(1)


@torch.no_grad()
def test_error(task: str, model, length: int, size: int) -> float:
    model.eval()
    x, y = examples(task, length, size, torch.Generator().manual_seed(104729))
    errors = torch.cat([losses(task, model, x[i:i + 250], y[i:i + 250])[1] for i in range(0, size, 250)])
    return float(errors.mean())


def train(cell: str, task: str, length: int, budget: Budget, chunks: int = 20) -> TrainedModel:
    """Adam with warm-up and cosine decay, gradients clipped by norm, a fresh batch each update."""
    started = time.time()
    model = build_model(cell, task, budget.units, budget.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    generator = torch.Generator().manual_seed(budget.seed + 1)
    schedule = {"lr": budget.lr}
    chunk = max(1, budget.steps // chunks)
    curve, running = [], []
    model.train()
    for step in range(budget.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step, budget.steps)
        x, y = examples(task, length, budget.batch_size, generator)
        loss = losses(task, model, x, y)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), budget.clip)
        optimizer.step()
        running.append(loss.item())
        if len(running) == chunk:
            curve.append((step + 1, sum(running) / chunk))
            running = []
    error = test_error(task, model, length, budget.test_size)
    return TrainedModel(cell, task, length, budget, model, sum(p.numel() for p in model.parameters()), error,
                        curve, time.time() - started)


_trained: dict = {}


def trained(cell: str, task: str, length: int, budget: Budget) -> TrainedModel:
    """`train`, once per process for the same arguments."""
    key = (cell, task, length, budget)
    if key not in _trained:
        _trained[key] = train(cell, task, length, budget)
    return _trained[key]
