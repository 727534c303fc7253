"""The int8 LSTM (csrc/int8_lstm.cpp, csrc/int8_product.cpp; contract csrc/rnn.h lstm::forward_int8):
inference of a plain LSTM whose weights `lstm.quantize` made int8 (`Recurrence.quantized`).

    per step  z = q(x_t) @ kernel + bias + q(h_{t-1}) @ recurrent_kernel, each product on int8
              operands with exact int32 sums, then scaled (problem.quantized_product: x_t and h
              quantized per row as they come); the gates, C and h in float32; Keras' masking
    products  AMX-INT8 tiles (TDPBSSD) where the CPU has them, else a plain integer loop over the
              same packed weights (the same numbers)
    threads   each runs every step for a range of the batch rows

The weights are packed for the products once per weight tensor (and again after an in-place
change). Takes float32 CPU problems without dropout, trace or gradients (what a quantized model
runs at inference); the rest of a quantized model's calls go to the reference kernel, which
computes the same products. Per-row lengths come as their mask. The cell call and the streaming
step take the sequence route (one step each).
"""

from __future__ import annotations

import weakref

import torch

from . import native, support
from .problem import QuantizedMatrix, Recurrence, RecurrenceResult, answers_empty_sequences

name = "int8_lstm"
takes_quantized = True


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
    kernel, recurrent_kernel = p.quantized
    y, h, c = native.module.int8_lstm_forward(
        p.inputs, _packed_values(kernel), kernel.scales, _packed_values(recurrent_kernel), recurrent_kernel.scales,
        p.bias, *p.initial_state, p.mask, p.go_backwards, p.zero_output_for_mask, p.return_sequences,
        *support.activation_codes(p.cell))
    return RecurrenceResult(y, (h, c))
