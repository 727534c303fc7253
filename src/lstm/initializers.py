"""Keras initializers by name or config, producing PyTorch tensors.

Fans follow Keras (`compute_fans`): for a 2-D weight, fan_in = rows, fan_out = columns, so an
LSTM kernel [D, 4U] uses the whole 4-gate matrix. `Orthogonal` is orthogonal over the whole
[U, 4U] recurrent matrix (its rows are orthonormal), as in Keras. A seed makes an initializer
return the same values on every call.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .serialization import ConfigurableRegistry


def _fans(shape) -> tuple[float, float]:
    if len(shape) == 0:
        return 1.0, 1.0
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class Initializer:
    """Base: `init(shape, dtype)` returns a new CPU tensor."""

    def __call__(self, shape, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


class _Seeded(Initializer):
    def __init__(self, seed: Optional[int] = None):
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed: expected an int or None, got {seed!r}")
        self.seed = seed

    def _generator(self) -> Optional[torch.Generator]:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


class Zeros(Initializer):
    def __call__(self, shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)


class Ones(Initializer):
    def __call__(self, shape, dtype=torch.float32):
        return torch.ones(shape, dtype=dtype)


class Constant(Initializer):
    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, shape, dtype=torch.float32):
        return torch.full(shape, float(self.value), dtype=dtype)

    def get_config(self):
        return {"value": self.value}


class RandomNormal(_Seeded):
    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape, dtype=torch.float32):
        return torch.normal(self.mean, self.stddev, size=tuple(shape), generator=self._generator(), dtype=dtype)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


class RandomUniform(_Seeded):
    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        super().__init__(seed)
        self.minval, self.maxval = minval, maxval

    def __call__(self, shape, dtype=torch.float32):
        u = torch.rand(tuple(shape), generator=self._generator(), dtype=dtype)
        return self.minval + (self.maxval - self.minval) * u

    def get_config(self):
        return {"minval": self.minval, "maxval": self.maxval, "seed": self.seed}


def _truncated_normal(shape, mean, stddev, generator, dtype):
    t = torch.empty(tuple(shape), dtype=dtype)
    return torch.nn.init.trunc_normal_(t, mean, stddev, mean - 2 * stddev, mean + 2 * stddev, generator=generator)


class TruncatedNormal(_Seeded):
    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape, dtype=torch.float32):
        return _truncated_normal(shape, self.mean, self.stddev, self._generator(), dtype)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


class VarianceScaling(_Seeded):
    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None):
        super().__init__(seed)
        if scale <= 0:
            raise ValueError(f"scale: expected a positive number, got {scale}")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"mode: expected 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError(
                f"distribution: expected 'truncated_normal', 'untruncated_normal' or 'uniform', got {distribution!r}"
            )
        self.scale, self.mode, self.distribution = scale, mode, distribution

    def __call__(self, shape, dtype=torch.float32):
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        scale = self.scale / max(1.0, n)
        g = self._generator()
        if self.distribution == "truncated_normal":
            # 0.879... is the stddev of a unit normal truncated to [-2, 2]
            return _truncated_normal(shape, 0.0, math.sqrt(scale) / 0.87962566103423978, g, dtype)
        if self.distribution == "untruncated_normal":
            return torch.normal(0.0, math.sqrt(scale), size=tuple(shape), generator=g, dtype=dtype)
        limit = math.sqrt(3.0 * scale)
        return (torch.rand(tuple(shape), generator=g, dtype=dtype) * 2 - 1) * limit

    def get_config(self):
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution, "seed": self.seed}


def _variance_scaling_alias(scale, mode, distribution):
    class Alias(VarianceScaling):
        def __init__(self, seed=None):
            super().__init__(scale, mode, distribution, seed)

        def get_config(self):
            return {"seed": self.seed}

    return Alias


GlorotUniform = type("GlorotUniform", (_variance_scaling_alias(1.0, "fan_avg", "uniform"),), {})
GlorotNormal = type("GlorotNormal", (_variance_scaling_alias(1.0, "fan_avg", "truncated_normal"),), {})
HeUniform = type("HeUniform", (_variance_scaling_alias(2.0, "fan_in", "uniform"),), {})
HeNormal = type("HeNormal", (_variance_scaling_alias(2.0, "fan_in", "truncated_normal"),), {})
LecunUniform = type("LecunUniform", (_variance_scaling_alias(1.0, "fan_in", "uniform"),), {})
LecunNormal = type("LecunNormal", (_variance_scaling_alias(1.0, "fan_in", "truncated_normal"),), {})


class Orthogonal(_Seeded):
    """QR of a normal matrix, signs fixed by diag(R), over the whole matrix (Keras' procedure)."""

    def __init__(self, gain=1.0, seed=None):
        super().__init__(seed)
        self.gain = gain

    def __call__(self, shape, dtype=torch.float32):
        if len(shape) < 2:
            raise ValueError(f"Orthogonal: expected a weight of rank >= 2, got shape {tuple(shape)}")
        rows = math.prod(shape[:-1])
        cols = shape[-1]
        a = torch.randn(max(rows, cols), min(rows, cols), generator=self._generator(), dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))
        if rows < cols:
            q = q.T
        return (self.gain * q).reshape(tuple(shape)).to(dtype)

    def get_config(self):
        return {"gain": self.gain, "seed": self.seed}


class Identity(Initializer):
    def __init__(self, gain=1.0):
        self.gain = gain

    def __call__(self, shape, dtype=torch.float32):
        if len(shape) != 2:
            raise ValueError(f"Identity: expected a 2-D weight, got shape {tuple(shape)}")
        return self.gain * torch.eye(*shape, dtype=dtype)

    def get_config(self):
        return {"gain": self.gain}


_registry = ConfigurableRegistry(
    "initializer",
    Initializer,
    [Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal, VarianceScaling, GlorotUniform,
     GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal, Orthogonal, Identity],
    aliases={"IdentityInitializer": Identity},
)


def get(identifier: Any, argument: str = "initializer") -> Initializer:
    """An initializer from a name ('glorot_uniform'), a class name, a config dict, or an instance."""
    return _registry.get(identifier, argument)


def serialize(initializer: Initializer) -> dict:
    return _registry.serialize(initializer)
