"""Keras weight constraints, applied after each optimizer step (never in the forward pass).

Call `lstm.apply_constraints(model)` right after `optimizer.step()`, as Keras' optimizer does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .serialization import ConfigurableRegistry

_EPSILON = 1e-7  # Keras' backend.epsilon()


class Constraint:
    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


class MaxNorm(Constraint):
    def __init__(self, max_value=2.0, axis=0):
        self.max_value, self.axis = max_value, axis

    def __call__(self, w):
        norms = w.square().sum(dim=self.axis, keepdim=True).sqrt()
        desired = norms.clamp(0, self.max_value)
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class NonNeg(Constraint):
    def __call__(self, w):
        return w * (w >= 0).to(w.dtype)


class UnitNorm(Constraint):
    def __init__(self, axis=0):
        self.axis = axis

    def __call__(self, w):
        return w / (_EPSILON + w.square().sum(dim=self.axis, keepdim=True).sqrt())

    def get_config(self):
        return {"axis": self.axis}


class MinMaxNorm(Constraint):
    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, w):
        norms = w.square().sum(dim=self.axis, keepdim=True).sqrt()
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * (desired / (_EPSILON + norms))

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate, "axis": self.axis}


_registry = ConfigurableRegistry("constraint", Constraint, [MaxNorm, NonNeg, UnitNorm, MinMaxNorm])


def get(identifier: Any, argument: str = "constraint") -> Optional[Constraint]:
    return None if identifier is None else _registry.get(identifier, argument)


def serialize(constraint: Optional[Constraint]) -> Optional[dict]:
    return None if constraint is None else _registry.serialize(constraint)


@torch.no_grad()
def apply_constraints(module: torch.nn.Module) -> None:
    """Project every constrained weight of `module` (and its children) back onto its constraint."""
    for sub in module.modules():
        for param_name, constraint in getattr(sub, "weight_constraints", lambda: {})().items():
            param = getattr(sub, param_name)
            param.copy_(constraint(param))
