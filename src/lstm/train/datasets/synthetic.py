"""The classic long-memory tasks, generated on the fly from a seed (Hochreiter & Schmidhuber 1997)."""

from __future__ import annotations

import torch


def adding(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [n, length, 2] (a uniform value, a 0/1 marker on exactly two steps), target [n, 1] = the
    sum of the two marked values. Predicting the mean (1) gives MSE 1/6 ~ 0.167."""
    values = torch.rand(n, length, generator=generator)
    first = torch.randint(0, length // 2, (n,), generator=generator)
    second = torch.randint(length // 2, length, (n,), generator=generator)
    marker = torch.zeros(n, length)
    rows = torch.arange(n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    target = (values * marker).sum(1, keepdim=True)
    return torch.stack([values, marker], dim=-1), target


def copy(n: int, delay: int, generator: torch.Generator, symbols: int = 8, length: int = 10):
    """Inputs [n, length + delay + length] of ids: `length` symbols 1..symbols, `delay - 1` blanks (0),
    a go marker (symbols + 1), then `length` blanks; targets: 0 (blank) everywhere except the last
    `length` steps, which must repeat the symbols. Guessing gives accuracy 1/symbols on those steps."""
    data = torch.randint(1, symbols + 1, (n, length), generator=generator)
    total = length + delay + length
    inputs = torch.zeros(n, total, dtype=torch.int64)
    inputs[:, :length] = data
    inputs[:, length + delay - 1] = symbols + 1
    targets = torch.zeros(n, total, dtype=torch.int64)
    targets[:, -length:] = data
    return inputs, targets
