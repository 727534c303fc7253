"""Argument checks with errors that name the argument, the expected and the actual value."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch


def check_units(units: Any, argument: str = "units") -> int:
    if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 1:
        raise ValueError(f"{argument}: expected a positive integer, got {units!r}")
    return int(units)


def check_activation_is_not_a_size(activation: Any, layer, units: int, size_arguments: str) -> None:
    """An int given as `activation` is torch.nn's habit of passing (input size, output size) to
    `layer.torch_counterpart`, where `layer` takes (units, activation): say how this layer is sized."""
    if isinstance(activation, numbers.Integral) and not isinstance(activation, bool):
        name, size = type(layer).__name__, int(activation)
        raise TypeError(
            f"activation: expected an activation name or a callable, got the int {size}. {name} takes one size, "
            f"units (its output size), and finds its input size on its first call (or from {size_arguments}): "
            f"torch.nn.{layer.torch_counterpart}({units}, {size}) is layers.{name}({size}) here, or "
            f"layers.{name}({size}, input_dim={units}) to create the weights at once")


def check_bool(value: Any, argument: str) -> bool:
    """A bool (Python's or NumPy's), as Keras types these arguments; anything else a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument}: expected True or False, got {value!r}")
    return bool(value)


def check_seed(seed: Any) -> Any:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {seed!r}")
    return seed


def check_shape(shape: Any, argument: str) -> tuple | None:
    """None, or a tuple of positive ints and None (unknown sizes)."""
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            s is None or (isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1) for s in shape):
        raise ValueError(f"{argument}: expected a tuple of positive ints or None, got {shape!r}")
    return tuple(shape)


def check_fraction(rate: Any, argument: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"{argument}: expected a float in [0, 1), got {rate!r}")
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{argument}: expected a float in [0, 1), got {rate}")
    return rate


def feature_size(input_shape: Any) -> int:
    """The feature size from an int or a shape whose last entry is the feature size."""
    size = input_shape if isinstance(input_shape, numbers.Integral) else (
        input_shape[-1] if isinstance(input_shape, (tuple, list, torch.Size)) and len(input_shape) else None)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"input_shape / input_dim: expected a positive feature size (an int, or a shape ending "
                         f"in one), got {input_shape!r}")
    return int(size)


def as_float_tensor(value: Any, argument: str) -> torch.Tensor:
    """Tensors pass through; NumPy arrays and lists become tensors. Integers, bools and complex
    numbers are refused (floats are cast to a layer's dtype by the layer)."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{argument}: expected a float tensor or array, got {type(value).__name__}") from error
    _check_dense(value, argument)
    if not value.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_dense(value: torch.Tensor, argument: str) -> None:
    """Sparse, nested and meta tensors reach the kernels as errors from deep inside torch; refuse them here."""
    if value.is_nested or value.layout != torch.strided:
        kind = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise TypeError(f"{argument}: expected a dense (strided) tensor, got {kind}")
    if value.is_meta:
        raise ValueError(f"{argument}: expected a tensor with data, got one on the meta device")


def check_mask(mask: Any, inputs: torch.Tensor, argument: str = "mask") -> torch.Tensor | None:
    """A [batch, timesteps] bool mask (ints are cast, as in Keras), on the inputs' device (`reset`
    is checked as one too)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(np.asarray(mask))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{argument}: expected a bool or integer tensor or array, got {type(mask).__name__}") \
                from error
    _check_dense(mask, argument)
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{argument}: expected a bool or integer tensor, got dtype {mask.dtype}")
    expected = tuple(inputs.shape[:2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{argument}: expected shape {expected} [batch, timesteps], got {tuple(mask.shape)}")
    return mask.to(device=inputs.device, dtype=torch.bool)


def check_lengths(lengths: Any, inputs: torch.Tensor) -> torch.Tensor | None:
    """Each row's number of valid steps, [batch] integers in [0, timesteps] (row b's steps are
    [0, lengths[b]), the rest padding), as int64 on the inputs' device."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(np.asarray(lengths))
        except (TypeError, ValueError) as error:
            raise TypeError(f"lengths: expected an integer tensor, list or array, got {type(lengths).__name__}") \
                from error
    _check_dense(lengths, "lengths")
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"lengths: expected integers (each row's number of valid steps), got dtype {lengths.dtype}")
    batch, steps = inputs.shape[:2]
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},) [batch], got {tuple(lengths.shape)}")
    # checked where the lengths are (a CPU tensor costs no device sync); a traced graph cannot raise on values
    if not torch.compiler.is_compiling() and batch:
        shortest, longest = (int(v) for v in torch.aminmax(lengths))
        if shortest < 0 or longest > steps:
            row = int(((lengths < 0) | (lengths > steps)).nonzero()[0, 0])
            raise ValueError(f"lengths: expected each value in [0, {steps}] (the inputs have {steps} timesteps), "
                             f"got lengths[{row}] = {int(lengths[row])}")
    return lengths.to(device=inputs.device, dtype=torch.int64)


def check_initial_state(states: Any, cell, batch: int, inputs: torch.Tensor | None, argument: str,
                        dtype: torch.dtype) -> list:
    """`state_count` tensors of shape [batch, units], cast to `dtype` (Keras casts initial states to
    the compute dtype); None means zeros."""
    device = None if inputs is None else inputs.device
    # checked here, where both are at hand: else torch fails deep inside the kernels
    if device is not None and cell.built and device != cell.kernel.device:
        raise ValueError(f"inputs: expected a tensor on the layer's device {cell.kernel.device}, got one on {device}; "
                         f"move the inputs (or the layer: layer.to(device))")
    if states is None:
        return cell.get_initial_state(batch, device=device, dtype=dtype)
    if isinstance(states, torch.Tensor):
        states = [states]
    if not isinstance(states, (list, tuple)) or len(states) != cell.state_count:
        names = "[h, c]" if cell.state_count == 2 else "[h]"
        got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
        raise ValueError(f"{argument}: expected {cell.state_count} state tensor(s) {names}, got {got}")
    checked = []
    for k, (state, size) in enumerate(zip(states, cell.state_sizes)):
        state = as_float_tensor(state, f"{argument}[{k}]")
        if tuple(state.shape) != (batch, size):
            raise ValueError(f"{argument}[{k}]: expected shape {(batch, size)} [batch, units], got "
                             f"{tuple(state.shape)}")
        checked.append(state.to(device=device, dtype=dtype))
    return checked
