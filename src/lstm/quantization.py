"""int8 inference: `lstm.quantize(model)`, the model with its LSTM layers on int8 weights."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .kernels import quantize_columns
from .layers import RecurrentCell


def quantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of `model` (with inplace=True, `model` itself) whose LSTM layers run with int8 weights.

    Each quantized cell's kernel and recurrent_kernel become int8 with a scale per output column
    (scale = max|column| / 127, values rounded half to even), kept as the buffers `kernel_int8`,
    `kernel_scales`, `recurrent_kernel_int8` and `recurrent_kernel_scales`; the parameters
    `kernel` and `recurrent_kernel` then hold the same matrices in float32 (values * scales), so
    `get_weights`, `to_torch` and `export_onnx` see the weights the model runs with; the cell's
    weights are frozen (requires_grad False: the model is for inference).
    At each step x_t and h are quantized per row as they come (dynamic quantization: scale =
    max|row| / 127); the products' sums are exact in int32; the bias, the gates, C and h stay
    float32. On the CPU the C++ core runs these products on AMX-INT8 tiles where the CPU has them;
    calls it does not take (a GPU, dropout in training, gradients) run the same maths on the
    reference kernel.

    Quantized: built float32 LSTM cells without a variant (peephole, layer norm, projection,
    coupled gates, forget_bias, cell_clip, zoneout, recurrent_dropconnect), Bidirectional's
    included (cells quantized before are left as they are). Other recurrent cells (GRU,
    SimpleRNN, the LSTM variants, other dtypes) keep their float weights, named in a warning; a
    model with no cell to quantize is a ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    quantized, kept, done = [], [], []
    for module in model.modules():
        if isinstance(module, RecurrentCell):
            if module.quantized_weights() is not None:
                done.append(module)
            else:
                (quantized if _quantizable(module) else kept).append(module)
    if not quantized and not done:
        found = ", ".join(f"{type(c).__name__} {c.name!r}" for c in kept) or "no recurrent cell"
        raise ValueError(f"model: no LSTM layer to quantize (lstm.quantize takes built float32 LSTM cells without "
                         f"variants); found {found}")
    for cell in quantized:
        _quantize_cell(cell)
    if kept:
        warnings.warn("lstm.quantize: these cells keep their float weights (only built float32 LSTM cells without "
                      "variants are quantized): " + ", ".join(f"{type(c).__name__} {c.name!r}" for c in kept),
                      stacklevel=2)
    return model


def _quantizable(cell: RecurrentCell) -> bool:
    return (cell.kind == "lstm" and cell.built and not cell.variants() and cell.kernel.dtype is torch.float32
            and cell.compute_dtype is torch.float32)


def _quantize_cell(cell: RecurrentCell) -> None:
    for weight in ("kernel", "recurrent_kernel"):
        value = getattr(cell, weight).detach()
        if not torch.isfinite(value).all():
            raise ValueError(f"model: {type(cell).__name__} {cell.name!r} {weight}: expected finite values to "
                             f"quantize, got {int((~torch.isfinite(value)).sum())} infinite or NaN")
        matrix = quantize_columns(value)
        cell.register_buffer(f"{weight}_int8", matrix.values)
        cell.register_buffer(f"{weight}_scales", matrix.scales)
        setattr(cell, weight, nn.Parameter(matrix.values.to(value.dtype) * matrix.scales))
    for weight in cell.weights():
        weight.requires_grad_(False)
