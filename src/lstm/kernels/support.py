"""The checks every fused C++ kernel makes before it takes a problem or a cell."""

from __future__ import annotations

from typing import Optional

import torch

from . import native
from .problem import LOW_PRECISION, Recurrence


def activation_codes(cell) -> Optional[tuple[int, int]]:
    """The C++ codes of a cell's (or CellSpec's) activation and recurrent activation; None when
    either is a callable or a name the C++ core lacks."""
    activation = native.activation_code(cell.activation)
    recurrent_activation = native.activation_code(cell.recurrent_activation)
    if activation is None or recurrent_activation is None:
        return None
    return activation, recurrent_activation


def on_cpu_in_one_float_dtype(p: Recurrence) -> bool:
    """Every tensor of the problem on the CPU with the input's dtype, float32 or float64 (the
    step mask and the lengths: on the CPU, any dtype)."""
    x = p.inputs
    dtype = x.dtype
    if (dtype is not torch.float32 and dtype is not torch.float64) or x.dim() != 3:
        return False
    for t in (x, p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout, p.peephole,
              p.projection, *(p.layer_norm or ()), *p.initial_state):
        if t is not None and (not t.is_cpu or t.dtype is not dtype):
            return False
    return (p.mask is None or p.mask.is_cpu) and (p.lengths is None or p.lengths.is_cpu)


def on_cpu_in_low_precision(p: Recurrence, dropout: bool) -> bool:
    """A bfloat16/float16 problem as the C++ core takes it (problem.py, Recurrence: "Precision"):
    on the CPU, every tensor in float32 or the compute dtype; dropout masks only if `dropout`."""
    x = p.inputs
    if x.dtype not in LOW_PRECISION or x.dim() != 3:
        return False
    if not dropout and (p.input_dropout is not None or p.recurrent_dropout is not None):
        return False
    dtypes = (x.dtype, torch.float32)
    for t in (x, p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout, p.peephole,
              p.projection, *(p.layer_norm or ()), *p.initial_state):
        if t is not None and (not t.is_cpu or t.dtype not in dtypes):
            return False
    return (p.mask is None or p.mask.is_cpu) and (p.lengths is None or p.lengths.is_cpu)


def on_one_device_in_compute_dtypes(p: Recurrence) -> bool:
    """Every tensor of the problem on the input's device; the floating ones in the input's dtype
    (float32, float64, bfloat16, float16), or in float32 for a bfloat16/float16 input (problem.py,
    Recurrence: "Precision")."""
    x = p.inputs
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.float64, *LOW_PRECISION):
        return False
    dtypes = (x.dtype, torch.float32)
    for t in (p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout, p.peephole, p.projection,
              *(p.layer_norm or ()), *p.initial_state, *(p.reset_state or ())):
        if t is not None and (t.device != x.device or t.dtype not in dtypes):
            return False
    return all(t is None or t.device == x.device for t in (p.mask, p.lengths, p.reset))


def steps_in_weights_dtype(cell) -> bool:
    """Whether a built cell computes in its weights' dtype, float32 or float64 (no mixed policy, no
    int8 weights): what the fused one-step routes (the cell call, the streaming step) compute in."""
    kernel = cell._parameters["kernel"]
    return (kernel is not None and kernel.dtype in (torch.float32, torch.float64) and cell.compute_dtype == kernel.dtype
            and cell.quantized_weights() is None)


def extension_ready() -> bool:
    """Whether the C++ extension is loaded (or, outside a trace, can be)."""
    if torch.compiler.is_compiling():
        return native.loaded_when_tracing()
    return (native.module or native.extension()) is not None
