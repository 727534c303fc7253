"""Keras activations by name, as PyTorch functions.

`hard_sigmoid` is Keras 3's `relu6(x + 3) / 6`; tf_keras (Keras 2) meant `clip(0.2x + 0.5, 0, 1)`,
which is `hard_sigmoid_tf_keras` here. Configs read from tf_keras map one to the other
(see `lstm.serialization`).
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F


def linear(x):
    return x


def hard_sigmoid(x):
    return torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


def hard_sigmoid_tf_keras(x):
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


def exponential(x):
    return torch.exp(x)


def softmax(x):
    return torch.softmax(x, dim=-1)


def leaky_relu(x):
    return F.leaky_relu(x, negative_slope=0.2)  # Keras' default slope


_BY_NAME: dict[str, Callable] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "linear": linear,
    "hard_sigmoid": hard_sigmoid,
    "hard_sigmoid_tf_keras": hard_sigmoid_tf_keras,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "elu": F.elu,
    "selu": F.selu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu6": F.relu6,
    "hard_silu": F.hardswish,
    "hard_swish": F.hardswish,
    "mish": F.mish,
    "log_sigmoid": F.logsigmoid,
    "hard_tanh": F.hardtanh,
    "exponential": exponential,
    "softmax": softmax,
    "leaky_relu": leaky_relu,
}

Activation = Union[str, Callable, None]


def names() -> list[str]:
    return sorted(_BY_NAME)


def canonical(activation: Activation, argument: str = "activation") -> Union[str, Callable]:
    """The name (or custom callable) an activation argument stands for; None means linear."""
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        if activation not in _BY_NAME:
            raise ValueError(
                f"{argument}: unknown activation {activation!r}; expected one of {names()} "
                "or a callable"
            )
        return activation
    for name, fn in _BY_NAME.items():
        if activation is fn:
            return name
    if callable(activation):
        return activation
    raise TypeError(f"{argument}: expected an activation name or a callable, got {type(activation).__name__}")


def get(activation: Activation) -> Callable:
    """The function for a name or callable."""
    activation = canonical(activation)
    return _BY_NAME[activation] if isinstance(activation, str) else activation


def serialize(activation: Union[str, Callable]) -> str:
    return activation if isinstance(activation, str) else getattr(activation, "__name__", repr(activation))
