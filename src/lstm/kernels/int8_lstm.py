"""The int8 LSTM (csrc/int8_lstm.cpp, csrc/int8_product.cpp; contract csrc/rnn.h lstm::forward_int8):
inference of a plain LSTM whose weights `lstm.quantize` made int8 (`Recurrence.quantized`).

    per step  z = q(x_t) @ kernel + bias + q(h_{t-1}) @ recurrent_kernel, each product on int8
              operands with exact int32 sums, then scaled (problem.quantized_product: x_t and h
              quantized per row as they come); the gates, C and h in float32; Keras' masking
    products  AMX-INT8 tiles (TDPBSSD) where the CPU has them, else AVX512-VNNI (VPDPBUSD), else
              a plain integer loop, over the same packed weights (csrc/int8_product.h: the same numbers)
    threads   each runs every step for a range of the batch rows

The weights are packed for the products once per weight tensor (and again after an in-place
change). Takes float32 CPU problems without dropout, trace or gradients (what a quantized model
runs at inference); the rest of a quantized model's calls go to the reference kernel, which
computes the same products. Per-row lengths it takes and turns into their mask itself (so that
choosing the kernel of a call with lengths builds no mask to ask it: it declines every problem
that is not quantized).

Capabilities besides `run`: the cell call (`cell_call`: `cell(x_t, [h, c])` as one C++ call of the
sequence forward with T = 1, skipping the `Recurrence` and the dispatch) and the streaming step
(`stream_step`: the C++ `Int8LSTMStep`, the same step on states it keeps; made again when a
parameter changes, as every stream step, but not when the int8 buffers are changed in place).
"""

from __future__ import annotations

import weakref

import torch

from . import dispatch, native, support
from .problem import QuantizedMatrix, Recurrence, RecurrenceResult, answers_empty_sequences

name = "int8_lstm"
takes_quantized = True
takes_lengths = True  # (as their mask: `Recurrence.masked`)


def supports(p: Recurrence) -> bool:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (p.inputs, p.bias, *p.initial_state))
    return (p.quantized is not None and p.plain and p.cell.kind == "lstm" and p.inputs.dtype is torch.float32
            and (p.bias is None or p.bias.dim() == 1) and support.activation_codes(p.cell) is not None
            and support.on_cpu_in_one_float_dtype(p) and p.input_dropout is None and p.recurrent_dropout is None
            and not p.trace and not needs_grad and support.extension_ready())


# id(values) -> (a weak reference to values, its version when packed, the packed tensor)
_packed: dict[int, tuple] = {}


def _packed_values(matrix: QuantizedMatrix) -> torch.Tensor:
    """The weight's int8 values packed for the products, kept while the values tensor lives and
    is not changed in place."""
    values = matrix.values
    key = id(values)
    entry = _packed.get(key)
    if entry is None or entry[0]() is not values or entry[1] != values._version:
        forget = weakref.ref(values, lambda _, key=key: _packed.pop(key, None))
        entry = _packed[key] = (forget, values._version, native.module.pack_int8(values))
    return entry[2]


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    p = p.masked()
    kernel, recurrent_kernel = p.quantized
    y, h, c = native.module.int8_lstm_forward(
        p.inputs, _packed_values(kernel), kernel.scales, _packed_values(recurrent_kernel), recurrent_kernel.scales,
        p.bias, *p.initial_state, p.mask, p.go_backwards, p.zero_output_for_mask, p.return_sequences,
        *support.activation_codes(p.cell))
    return RecurrenceResult(y, (h, c))


def _quantized_lstm_codes(cell):
    """The activation codes of a built plain float32 LSTM cell with int8 weights, else None."""
    weights = cell._parameters["kernel"]
    if (cell.kind != "lstm" or not cell.built or cell.quantized_weights() is None or not cell.cell_spec().plain
            or weights.dtype is not torch.float32 or cell.compute_dtype is not torch.float32 or not weights.is_cpu
            or not support.extension_ready()):
        return None
    return support.activation_codes(cell)


class CellCall:
    """The cell call `out, [h, c] = cell(x_t, [h, c])` of an int8 LSTM cell as one C++ call. A call
    it does not take (states to make or convert, an error to report, masks drawn in training,
    autocast, gradients, another kernel forced) returns None: the cell takes the full route, which
    computes the same numbers or raises its error."""

    __slots__ = ("codes", "draws")

    def __init__(self, cell, codes: tuple[int, int]):
        self.codes = codes
        self.draws = bool(cell.dropout or cell.recurrent_dropout)

    def __call__(self, cell, x, states, training):
        if self.draws and (cell.training if training is None else training):
            return None
        forced = dispatch.forced_name()
        if (forced and forced != name) or torch.is_autocast_enabled("cpu") or type(states) not in (list, tuple):
            return None
        if len(states) != 2 or not all(type(s) is torch.Tensor for s in states):
            return None
        h, c = states
        shape = (x.shape[0], cell.units)
        tensors = (x, h, c, cell.bias)
        if (x.dim() != 2 or x.shape[1] != cell.input_dim or h.shape != shape or c.shape != shape
                or any(t is not None and (t.dtype is not torch.float32 or not t.is_cpu) for t in tensors)
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))):
            return None
        kernel, recurrent_kernel = cell.quantized_weights()
        y, h, c = native.module.int8_lstm_forward(
            x[:, None], _packed_values(kernel), kernel.scales, _packed_values(recurrent_kernel),
            recurrent_kernel.scales, cell.bias, h, c, None, False, False, False, *self.codes)
        return y, [h, c]


def cell_call(cell):
    codes = _quantized_lstm_codes(cell)
    return None if codes is None else CellCall(cell, codes)


def stream_step(cell, batch_size: int):
    codes = _quantized_lstm_codes(cell)
    if codes is None:
        return None
    kernel, recurrent_kernel = cell.quantized_weights()
    return native.module.Int8LSTMStep(_packed_values(kernel), kernel.scales, _packed_values(recurrent_kernel),
                                      recurrent_kernel.scales, cell.bias, cell.input_dim, batch_size, *codes)
