"""Keras' core layers around the recurrent ones, with Keras semantics, as PyTorch modules:
`Embedding`, `Masking`, `Dense`, `Dropout`, `TimeDistributed`, `InputLayer` (and `Input`).

Every layer is called as `layer(inputs, mask=None, training=None)`; layers that create or
change a mask have `compute_mask(inputs, mask)` (see `lstm.models.Sequential`, which passes
the mask on as Keras does). Weights are in Keras' layout (`Dense.kernel` [in, units],
`Embedding.embeddings` [input_dim, output_dim]) with `get_weights`/`set_weights` in Keras order.
Configs (`get_config`/`from_config`) read this library's, Keras 3's and tf_keras' formats.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import activations, constraints, initializers, regularizers
from ..serialization import (FLOAT_DTYPES, activation_from_config, detect_dialect, dtype_name, parse_dtype,
                             unique_name)
from . import rng
from .config import nested
from .precision import PolicyLayer, weight_array
from .validation import (check_activation_is_not_a_size, check_bool, check_fraction, check_seed, check_shape,
                         check_units, feature_size)

# Keys Keras writes that change nothing at inference here (null/defaults checked where it matters).
_BENIGN = {"module", "registered_name", "build_config", "batch_input_shape", "batch_shape", "input_length",
           "quantization_config", "lora_rank", "lora_alpha", "sparse", "ragged", "optional"}


_ALIASES = {"uniform": initializers.RandomUniform, "normal": initializers.RandomNormal}


def _initializer(identifier, argument: str):
    if isinstance(identifier, str) and identifier in _ALIASES:  # Keras' short names
        identifier = _ALIASES[identifier]()
    return initializers.get(identifier, argument)


def _check_keys(cls, config: dict, accepted: set) -> dict:
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    kwargs = {k: v for k, v in config.items() if k not in _BENIGN}
    for key in ("lora_rank", "quantization_config"):
        if config.get(key):
            raise ValueError(f"config: {cls.__name__} with {key}={config[key]!r} is not supported")
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)} for {cls.__name__}")
    return kwargs


def _to_tensor(inputs: Any, argument: str = "inputs") -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    try:
        return torch.as_tensor(np.asarray(inputs))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{argument}: expected a tensor or array, got {type(inputs).__name__}") from error


class _Layer(PolicyLayer, nn.Module):
    """What the core layers share: name, trainable, dtype policy, Keras weight I/O."""

    default_name = "layer"
    _weight_names: tuple = ()

    def __init__(self, name=None, trainable=True, dtype=None):
        super().__init__()
        self.name = name or unique_name(self.default_name)
        self.trainable = check_bool(trainable, "trainable")
        self.dtype_policy = dtype if dtype is not None else "float32"
        for weight in self._weight_names:
            self.register_parameter(weight, None)

    @property
    def built(self) -> bool:
        return all(getattr(self, w) is not None for w in self._weight_names if self._wants(w))

    def _wants(self, weight: str) -> bool:
        return True

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, w) for w in self._weight_names if getattr(self, w) is not None]

    def get_weights(self) -> list[np.ndarray]:
        return [weight_array(w) for w in self.weights()]

    def _build_from_weights(self, weights: Sequence[Any]) -> None:  # lazy layers override
        raise ValueError(f"set_weights: {type(self).__name__} {self.name!r} is not built")

    def set_weights(self, weights: Sequence[Any]) -> None:
        weights = list(weights)
        names = [w for w in self._weight_names if self._wants(w)]
        if not self.built:
            if not weights:
                raise ValueError("set_weights: got no weights")
            self._build_from_weights(weights)
        if len(weights) != len(names):
            raise ValueError(f"set_weights: {type(self).__name__} {self.name!r} expected {len(names)} arrays "
                             f"({', '.join(names)}), got {len(weights)}")
        for weight_name, value in zip(names, weights):
            param = getattr(self, weight_name)
            value = torch.as_tensor(np.asarray(value), dtype=param.dtype)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"set_weights: {self.name!r} {weight_name} expected shape {tuple(param.shape)}, "
                                 f"got {tuple(value.shape)}")
            with torch.no_grad():
                param.copy_(value)

    def _make(self, weight: str, value: torch.Tensor, device=None) -> None:
        setattr(self, weight, nn.Parameter(value.to(device), requires_grad=self.trainable))

    def _base_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, "dtype": self.dtype_config()}

    def _first_weight(self) -> Optional[torch.Tensor]:
        weights = self.weights()
        return weights[0] if weights else None

    def compute_mask(self, inputs, mask=None):
        return mask

    @classmethod
    def _accepted(cls) -> set:
        import inspect

        accepted = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                accepted |= set(inspect.signature(klass.__init__).parameters) - {"self", "args", "kwargs"}
        return accepted

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        kwargs = _check_keys(cls, config, cls._accepted())
        dialect = dialect or detect_dialect(config)
        if "activation" in kwargs:
            kwargs["activation"] = activation_from_config(kwargs["activation"], dialect)
        return cls(**kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class InputLayer(_Layer):
    """Keras' input placeholder: a no-op here, apart from casting floating inputs to its float
    dtype (as Keras' layers do). Keeps `batch_shape` for the config."""

    default_name = "input_layer"

    def __init__(self, shape=None, batch_size=None, dtype=None, sparse=None, batch_shape=None, input_tensor=None,
                 optional=False, name=None, ragged=None, batch_input_shape=None, input_shape=None,
                 trainable=True):
        if input_tensor is not None:
            raise ValueError("InputLayer: input_tensor is not supported")
        nn.Module.__init__(self)
        self.name = name or unique_name(self.default_name)
        self.trainable = check_bool(trainable, "trainable")
        if batch_shape is None:
            batch_shape = batch_input_shape
        if batch_shape is None and (shape is not None or input_shape is not None):
            batch_shape = (batch_size, *(shape if shape is not None else input_shape))
        self.batch_shape = check_shape(batch_shape, "batch_shape")
        self.input_dtype = dtype_name(parse_dtype(dtype)) if _is_float_name(dtype) else (dtype or "float32")
        if isinstance(self.input_dtype, dict):
            self.input_dtype = (self.input_dtype.get("config") or {}).get("name", "float32")
        self.dtype_policy = "float32"

    def forward(self, inputs, mask=None, training=None):
        inputs = _to_tensor(inputs)
        if inputs.is_floating_point() and _is_float_name(self.input_dtype):
            inputs = inputs.to(parse_dtype(self.input_dtype))
        return inputs

    def get_config(self) -> dict:
        return {"batch_shape": None if self.batch_shape is None else list(self.batch_shape),
                "dtype": self.input_dtype, "name": self.name}

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        kwargs = {k: v for k, v in config.items() if k not in ("module", "registered_name", "build_config")}
        unknown = set(kwargs) - cls._accepted()
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)} for InputLayer")
        return cls(**kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, batch_shape={self.batch_shape}, dtype={self.input_dtype!r}"


def _is_float_name(dtype) -> bool:
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    return isinstance(dtype, torch.dtype) or dtype in FLOAT_DTYPES


def Input(shape=None, batch_size=None, dtype=None, batch_shape=None, name=None, **kwargs) -> InputLayer:
    """Keras' `Input(shape)`: here it returns the (no-op) `InputLayer`, to put first in a Sequential."""
    return InputLayer(shape=shape, batch_size=batch_size, dtype=dtype, batch_shape=batch_shape, name=name, **kwargs)


class Embedding(_Layer):
    """Token ids [B, T] (any integer dtype; floats are cast, as Keras does) to vectors
    [B, T, output_dim] from `embeddings` [input_dim, output_dim]. With `mask_zero`, id 0 is
    padding: `compute_mask` gives `inputs != 0` for the next layer."""

    default_name = "embedding"
    _weight_names = ("embeddings",)

    def __init__(self, input_dim, output_dim, embeddings_initializer="uniform", embeddings_regularizer=None,
                 embeddings_constraint=None, mask_zero=False, activity_regularizer=None, weights=None,
                 name=None, trainable=True, dtype=None, input_shape=None):
        super().__init__(name, trainable, dtype)
        self.input_dim = check_units(input_dim, "input_dim")
        self.output_dim = check_units(output_dim, "output_dim")
        self.embeddings_initializer = _initializer(embeddings_initializer, "embeddings_initializer")
        self.embeddings_regularizer = regularizers.get(embeddings_regularizer, "embeddings_regularizer")
        self.embeddings_constraint = constraints.get(embeddings_constraint, "embeddings_constraint")
        self.activity_regularizer = regularizers.get(activity_regularizer, "activity_regularizer")
        self.mask_zero = check_bool(mask_zero, "mask_zero")
        self._make("embeddings", self.embeddings_initializer((self.input_dim, self.output_dim), self.dtype))
        if weights is not None:
            self.set_weights(weights)

    def forward(self, inputs, mask=None, training=None):
        inputs = _to_tensor(inputs)
        if inputs.is_floating_point() or inputs.dtype == torch.bool:
            inputs = inputs.to(torch.int64)
        if torch.compiler.is_compiling():  # torch.compile / export: the same check, without a graph break
            torch._assert_async((inputs.min() >= 0) & (inputs.max() < self.input_dim) if inputs.numel()
                                else inputs.new_ones((), dtype=torch.bool),
                                f"inputs: {self.name!r} expects token ids in [0, {self.input_dim})")
        elif inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.input_dim):
            raise ValueError(f"inputs: {self.name!r} expects token ids in [0, {self.input_dim}), got values in "
                             f"[{int(inputs.min())}, {int(inputs.max())}]")
        # F.embedding: its backward sums repeated ids (the padding) in parallel; indexing's adds them one by one
        embedded = torch.nn.functional.embedding(inputs.long(), self.embeddings)
        return embedded.to(self.compute_dtype)  # (Keras: a mixed policy's outputs)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return _to_tensor(inputs) != 0

    @property
    def losses(self) -> list[torch.Tensor]:
        return [] if self.embeddings_regularizer is None else [self.embeddings_regularizer(self.embeddings)]

    def weight_constraints(self) -> dict:
        return {} if self.embeddings_constraint is None else {"embeddings": self.embeddings_constraint}

    def get_config(self) -> dict:
        return {**self._base_config(), "input_dim": self.input_dim, "output_dim": self.output_dim,
                "embeddings_initializer": initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": regularizers.serialize(self.embeddings_regularizer),
                "activity_regularizer": regularizers.serialize(self.activity_regularizer),
                "embeddings_constraint": constraints.serialize(self.embeddings_constraint),
                "mask_zero": self.mask_zero}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_dim={self.input_dim}, output_dim={self.output_dim}, mask_zero={self.mask_zero}"


class Masking(_Layer):
    """Masks the time steps whose features all equal `mask_value`: mask = any(x != mask_value, -1),
    output = where(mask, x, 0)."""

    default_name = "masking"

    def __init__(self, mask_value=0.0, name=None, trainable=True, dtype=None, input_shape=None):
        super().__init__(name, trainable, dtype)
        if isinstance(mask_value, bool) or not isinstance(mask_value, numbers.Real):
            raise TypeError(f"mask_value: expected a number, got {mask_value!r}")
        self.mask_value = float(mask_value)

    def _mask(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.any(inputs != self.mask_value, dim=-1)

    def forward(self, inputs, mask=None, training=None):
        inputs = _to_tensor(inputs)
        keep = self._mask(inputs)[..., None]
        return torch.where(keep, inputs, torch.zeros((), dtype=inputs.dtype, device=inputs.device))

    def compute_mask(self, inputs, mask=None):
        return self._mask(_to_tensor(inputs))

    def get_config(self) -> dict:
        return {**self._base_config(), "mask_value": self.mask_value}


class Dense(_Layer):
    """`activation(inputs @ kernel + bias)` on the last axis (so per time step on [B, T, D]);
    `kernel` [in, units] as in Keras, built on the first call or at once with `input_dim`/`input_shape`."""

    default_name = "dense"
    torch_counterpart = "Linear"  # the torch.nn module taking (input size, output size), named in errors
    _weight_names = ("kernel", "bias")

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, bias_constraint=None, name=None,
                 trainable=True, dtype=None, input_shape=None, input_dim=None):
        super().__init__(name, trainable, dtype)
        self.units = check_units(units)
        check_activation_is_not_a_size(activation, self, self.units, "input_dim= / input_shape=")
        self.activation = activations.canonical(activation, "activation")
        self.use_bias = check_bool(use_bias, "use_bias")
        self.kernel_initializer = _initializer(kernel_initializer, "kernel_initializer")
        self.bias_initializer = _initializer(bias_initializer, "bias_initializer")
        self.kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self.bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")
        self.activity_regularizer = regularizers.get(activity_regularizer, "activity_regularizer")
        self.kernel_constraint = constraints.get(kernel_constraint, "kernel_constraint")
        self.bias_constraint = constraints.get(bias_constraint, "bias_constraint")
        if input_dim is None and input_shape is not None:
            input_dim = feature_size(input_shape)
        if input_dim is not None:
            self.build(input_dim)

    def _wants(self, weight: str) -> bool:
        return weight != "bias" or self.use_bias

    @property
    def built(self) -> bool:
        return self.kernel is not None

    @property
    def input_dim(self) -> Optional[int]:
        return None if self.kernel is None else self.kernel.shape[0]

    def build(self, input_shape, device=None) -> None:
        input_dim = feature_size(input_shape)
        self._make("kernel", self.kernel_initializer((input_dim, self.units), self.dtype), device)
        if self.use_bias:
            self._make("bias", self.bias_initializer((self.units,), self.dtype), device)

    def _build_from_weights(self, weights) -> None:
        self.build(np.shape(weights[0])[0])

    def forward(self, inputs, mask=None, training=None):
        inputs = _to_tensor(inputs)
        if not inputs.is_floating_point():
            raise TypeError(f"inputs: expected a floating-point tensor, got dtype {inputs.dtype}")
        if not self.built:
            from .base import build_now

            build_now(self, inputs)
        elif inputs.shape[-1] != self.input_dim:
            raise ValueError(f"inputs: {self.name!r} expects {self.input_dim} features, got input shape "
                             f"{tuple(inputs.shape)}")
        compute = self.call_dtype(inputs.device)  # (Keras casts floating inputs to it)
        out = inputs.to(compute) @ self.kernel.to(compute)
        if self.bias is not None:
            out = out + self.bias.to(compute)
        return activations.get(self.activation)(out)

    @property
    def losses(self) -> list[torch.Tensor]:
        pairs = ((self.kernel, self.kernel_regularizer), (self.bias, self.bias_regularizer))
        return [reg(w) for w, reg in pairs if reg is not None and w is not None]

    def weight_constraints(self) -> dict:
        pairs = (("kernel", self.kernel_constraint), ("bias", self.bias_constraint))
        return {w: c for w, c in pairs if c is not None and getattr(self, w) is not None}

    def get_config(self) -> dict:
        return {**self._base_config(), "units": self.units,
                "activation": activations.serialize(self.activation), "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": regularizers.serialize(self.activity_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint)}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, units={self.units}, input_dim={self.input_dim}, activation={self.activation!r}"


class Dropout(_Layer):
    """Keras' Dropout: in training, zeroes a fraction `rate` of the inputs and scales the rest
    by 1 / (1 - rate); identity at inference. `noise_shape` (None entries = the input's size)
    shares the mask along axes of size 1. `training=None` follows `module.training`."""

    default_name = "dropout"

    def __init__(self, rate, noise_shape=None, seed=None, name=None, trainable=True, dtype=None, input_shape=None):
        super().__init__(name, trainable, dtype)
        self.rate = check_fraction(rate, "rate")
        self.noise_shape = check_shape(noise_shape, "noise_shape")
        self.seed = check_seed(seed)
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def forward(self, inputs, mask=None, training=None):
        inputs = _to_tensor(inputs)
        training = self.training if training is None else bool(training)
        if not training or self.rate == 0.0:
            return inputs
        shape = tuple(inputs.shape) if self.noise_shape is None else tuple(
            inputs.shape[k] if s is None else s for k, s in enumerate(self.noise_shape))
        if len(shape) != inputs.dim() or any(s not in (1, n) for s, n in zip(shape, inputs.shape)):
            raise ValueError(f"noise_shape: expected {inputs.dim()} sizes, each 1 or the input's (input shape "
                             f"{tuple(inputs.shape)}), got {self.noise_shape}")
        keep = rng.bernoulli(shape, 1.0 - self.rate, inputs.dtype, self._generator)  # (torch.compile-safe)
        return inputs * (keep / (1.0 - self.rate)).to(inputs.device)

    def get_config(self) -> dict:
        return {**self._base_config(), "rate": self.rate,
                "noise_shape": None if self.noise_shape is None else list(self.noise_shape), "seed": self.seed}


class TimeDistributed(_Layer):
    """Applies `layer` to every time step of [B, T, ...] (as Keras: folds time into the batch).
    The mask passes through."""

    default_name = "time_distributed"

    def __init__(self, layer: nn.Module, name=None, trainable=True, dtype=None, input_shape=None):
        super().__init__(name, trainable, dtype)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer: expected a layer, got {type(layer).__name__}")
        self.layer = layer

    def forward(self, inputs, mask=None, training=None):
        inputs = _to_tensor(inputs)
        if inputs.dim() < 3:
            raise ValueError(f"inputs: TimeDistributed needs [batch, timesteps, ...], got shape {tuple(inputs.shape)}")
        batch, steps = inputs.shape[:2]
        out = self.layer(inputs.reshape(batch * steps, *inputs.shape[2:]), training=training)
        return out.reshape(batch, steps, *out.shape[1:])

    def get_weights(self) -> list[np.ndarray]:
        return self.layer.get_weights()

    def set_weights(self, weights) -> None:
        self.layer.set_weights(weights)

    @property
    def built(self) -> bool:
        return getattr(self.layer, "built", True)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(self.layer, "compute_dtype", super().compute_dtype)

    def get_config(self) -> dict:
        from . import serialize

        return {**self._base_config(), "layer": serialize(self.layer)}

    @classmethod
    def from_config(cls, config: dict, dialect: Optional[str] = None):
        from . import deserialize

        kwargs = _check_keys(cls, config, cls._accepted())
        if not isinstance(kwargs.get("layer"), dict):
            raise ValueError(f"config: a TimeDistributed config needs a 'layer' dict, got {kwargs.get('layer')!r}")
        kwargs["layer"] = nested("['layer']", deserialize, kwargs["layer"], dialect)
        kwargs.pop("dtype", None)
        return cls(**kwargs)


__all__ = ["InputLayer", "Input", "Embedding", "Masking", "Dense", "Dropout", "TimeDistributed"]
