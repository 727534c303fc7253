"""Keras weight regularizers: each returns a penalty to add to the loss (`layer.losses`).

As in Keras 3, `L2(l)` is `l * sum(w**2)`, with no one-half.
"""

from __future__ import annotations

import numbers

from typing import Any, Optional

import torch

from .serialization import ConfigurableRegistry


class Regularizer:
    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    value = float(value)
    if value < 0 or value != value:
        raise ValueError(f"{name}: expected a non-negative number, got {value}")
    return value


class L1L2(Regularizer):
    def __init__(self, l1=0.0, l2=0.0):
        self.l1, self.l2 = _non_negative("l1", l1), _non_negative("l2", l2)

    def __call__(self, weight):
        penalty = weight.new_zeros(())
        if self.l1:
            penalty = penalty + self.l1 * weight.abs().sum()
        if self.l2:
            penalty = penalty + self.l2 * weight.square().sum()
        return penalty

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(Regularizer):
    def __init__(self, l1=0.01):
        self.l1 = _non_negative("l1", l1)

    def __call__(self, weight):
        return self.l1 * weight.abs().sum()

    def get_config(self):
        return {"l1": self.l1}


class L2(Regularizer):
    def __init__(self, l2=0.01):
        self.l2 = _non_negative("l2", l2)

    def __call__(self, weight):
        return self.l2 * weight.square().sum()

    def get_config(self):
        return {"l2": self.l2}


class OrthogonalRegularizer(Regularizer):
    """factor * mean |off-diagonal| of the Gram matrix of the L2-normalised rows (or columns)."""

    def __init__(self, factor=0.01, mode="rows"):
        if mode not in ("rows", "columns"):
            raise ValueError(f"mode: expected 'rows' or 'columns', got {mode!r}")
        self.factor, self.mode = _non_negative("factor", factor), mode

    def __call__(self, weight):
        w = weight if self.mode == "rows" else weight.T
        w = torch.nn.functional.normalize(w, dim=1)
        gram = w @ w.T
        n = gram.shape[0]
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        return self.factor * off_diagonal.abs().sum() / max(1, n * (n - 1))

    def get_config(self):
        return {"factor": self.factor, "mode": self.mode}


_registry = ConfigurableRegistry(
    "regularizer", Regularizer, [L1L2, L1, L2, OrthogonalRegularizer], aliases={"l1_l2": L1L2}
)


def get(identifier: Any, argument: str = "regularizer") -> Optional[Regularizer]:
    return None if identifier is None else _registry.get(identifier, argument)


def serialize(regularizer: Optional[Regularizer]) -> Optional[dict]:
    return None if regularizer is None else _registry.serialize(regularizer)
