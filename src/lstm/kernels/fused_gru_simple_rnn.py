"""The C++ fused kernels of the GRU and the SimpleRNN (csrc/gru.cpp, csrc/simple_rnn.cpp; their
loops and layouts: csrc/rnn.h, the torch side: csrc/bindings/), thin bindings here.

    forward   x @ kernel, one GEMM over all steps (dropout masks first); per step one fused pass:
              h @ R, the gates, the state and the output
    backward  per step (reverse), hand-derived from the saved buffers; then the weight gradients,
              one GEMM each over all steps

Supported: GRU (reset_after True or False, bias [3U] or [2, 3U]) and SimpleRNN, CPU float32/float64
and bfloat16/float16 (`_SequenceOp`), the named activations, every option of a plain `Recurrence`.

Per-row lengths (`Recurrence.lengths`, or a right-padded mask) and resets: the call runs packed
(packing.py, csrc/row_layout.h), as fused_cpp's LSTM: only the rows' valid steps (a reset starts a
row of its own), so the products over all steps, each step's product and its gate math do work in
proportion to the sum of the lengths. Traces and torch.compile take the mask route instead (and
leave resets to the reference kernel); rows all of full length, the unmasked one.

Traces (`trace=True`) come from the saving forward's buffers (time-indexed, flipped for
go_backwards), detached: GRU z, r, h_tilde are the saved gates and h = z * h_prev + (1 - z) *
h_tilde (a masked step's own value, as the reference gives it); SimpleRNN h is the saved outputs.

Autograd, torch.compile and torch.export: `fused.FusedOp` (the custom ops are lstm::fused_gru_* and
lstm::fused_simple_rnn_*).

Capabilities besides `run`: the cell call (`CellCall`) and the streaming step (`StreamStep`), each
the C++ sequence forward with T = 1 called directly, skipping the `Recurrence` and the dispatch
(the C++ has no step object of its own for these cells). The checks of the full route are made
here first; a call they do not pass goes the full route, which computes the same numbers or
raises its error.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch, fused, native, packing, support
from .problem import Recurrence, RecurrenceResult, answers_empty_sequences
from .reference import autocast_off

name = "fused_gru_simple_rnn"
takes_lengths = True
takes_resets = True  # (packed: packing.py)


def supports(p: Recurrence) -> bool:
    return (p.plain and p.cell.kind in ("gru", "simple_rnn") and support.activation_codes(p.cell) is not None
            and (support.on_cpu_in_one_float_dtype(p) or support.on_cpu_in_low_precision(p, dropout=True))
            and (p.reset is None or packing.can_pack(p, packable=not p.trace)) and support.extension_ready())


class GRUOptions(NamedTuple):
    """The C++ GRU forward's and backward's options, in their order."""

    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    activation: int
    recurrent_activation: int
    reset_after: bool


class SimpleRNNOptions(NamedTuple):
    """The C++ SimpleRNN forward's and backward's options, in their order."""

    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    activation: int


class _SequenceOp(fused.FusedOp):
    """forward -> y, h_last, then with save the buffers of csrc/rnn.h (gru::, simple_rnn::): GRU gates
    [B,T,3U], h_prev and candidate_input [B,T,U]; SimpleRNN outputs and h_prev [B,T,U]. Packed
    (batch_sizes given): x [N,1,D], input_dropout per packed row [G,N,D], recurrent_dropout per
    packed batch row [G,B,U], y and the saved buffers [N,1,*] (csrc/bindings/bindings.h).

    In bfloat16/float16 the C++ takes every tensor in its own dtype (the weights float32 under a
    mixed policy) and rounds the products' operands itself (csrc/bindings/optional_tensor.h:
    LoopOperand): the recurrence runs in float32, y and h_last come back in the compute dtype, the
    saved buffers in float32, the gradients in float32 (converted here to their inputs' dtypes)."""

    input_names = ("x", "kernel", "recurrent_kernel", "bias", "h0")
    fixed_names = ("input_dropout", "recurrent_dropout", "mask", "batch_sizes")
    output_count = 2
    saved_widths: tuple  # of the saved buffers, in units

    def forward(self, inputs, fixed, options, save):
        with autocast_off(inputs[0].device.type):  # (the C++ products' operands are its own casts)
            return self.cpp_forward(inputs, fixed, options, save, fused.OPERAND_CODES.get(inputs[0].dtype, 0))

    def backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite):
        with autocast_off(inputs[0].device.type):
            grads = self.cpp_backward(output_grads, inputs, saved, fixed, options, needs,
                                      fused.OPERAND_CODES.get(inputs[0].dtype, 0))
        return fused.in_input_dtypes(grads, inputs)

    def forward_dtypes(self, inputs, fixed, options, save):
        return fused.outputs_in_compute_dtype(self, inputs, fixed, options, save)

    def forward_shapes(self, inputs, fixed, options, save):
        x, recurrent_kernel, h0 = inputs[0], inputs[2], inputs[4]
        (rows, columns, _), units, batch = x.shape, recurrent_kernel.shape[0], h0.shape[0]  # (packed: x [N, 1, D])
        shapes = [(rows, columns, units) if options.return_sequences else (batch, units), (batch, units)]
        return shapes + [(rows, columns, width * units) for width in self.saved_widths] if save else shapes


class GRUOp(_SequenceOp):
    name = "fused_gru"
    Options = GRUOptions
    saved_widths = (3, 1, 1)

    def cpp_forward(self, inputs, fixed, options, save, operand):
        return native.module.gru_forward(*inputs, *fixed, *options, save, operand)

    def cpp_backward(self, output_grads, inputs, saved, fixed, options, needs, operand):
        x, kernel, recurrent_kernel, bias = inputs[:4]
        return native.module.gru_backward(*output_grads, x, kernel, recurrent_kernel, 0 if bias is None else bias.dim(),
                                          *saved, *fixed, *options, needs, operand)


class SimpleRNNOp(_SequenceOp):
    name = "fused_simple_rnn"
    Options = SimpleRNNOptions
    saved_widths = (1, 1)

    def cpp_forward(self, inputs, fixed, options, save, operand):
        return native.module.simple_rnn_forward(*inputs, *fixed, *options, save, operand)

    def cpp_backward(self, output_grads, inputs, saved, fixed, options, needs, operand):
        x, kernel, recurrent_kernel, bias = inputs[:4]
        return native.module.simple_rnn_backward(*output_grads, x, kernel, recurrent_kernel,
                                                 0 if bias is None else bias.dim(), *saved, *fixed, *options, needs,
                                                 operand)


GRU_OP, SIMPLE_RNN_OP = GRUOp(), SimpleRNNOp()


def _trace(p: Recurrence, saved) -> dict:
    saved = [t.detach().flip(1) if p.go_backwards else t.detach() for t in saved]
    if p.cell.kind == "simple_rnn":
        return {"h": saved[0]}
    gates, h_prev = saved[0], saved[1]
    z, r, h_tilde = gates.chunk(3, dim=-1)
    return {"z": z, "r": r, "h_tilde": h_tilde, "h": z * h_prev + (1 - z) * h_tilde}


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    p, lengths = packing.route(p, packable=not p.trace)
    if lengths is not None:
        return _run_packed(p, lengths)
    op, options = _op_and_options(p.cell, p.go_backwards, p.zero_output_for_mask, p.return_sequences)
    inputs = (p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.initial_state[0])
    fixed = (p.input_dropout, p.recurrent_dropout, p.mask, None)
    (y, h_last), saved = op.call(inputs, fixed, options, keep_saved=p.trace)
    return RecurrenceResult(y, (h_last,), _trace(p, saved) if p.trace else None)


def _run_packed(p: Recurrence, lengths: Tensor) -> RecurrenceResult:
    """The call on the rows' valid steps only (packing.py)."""
    op, options = _op_and_options(p.cell, return_sequences=p.return_sequences)

    def call(x, states, input_dropout, recurrent_dropout, batch_sizes):
        inputs = (x, p.kernel, p.recurrent_kernel, p.bias, *states)
        return op.call(inputs, (input_dropout, recurrent_dropout, None, batch_sizes), options)[0]

    return packing.run_packed(p, lengths, call)


def _op_and_options(cell, go_backwards=False, zero_output_for_mask=False, return_sequences=False):
    activation, recurrent_activation = support.activation_codes(cell)
    flags = (bool(go_backwards), bool(zero_output_for_mask), bool(return_sequences), activation)
    if cell.kind == "gru":
        return GRU_OP, GRUOptions(*flags, recurrent_activation, bool(cell.reset_after))
    return SIMPLE_RNN_OP, SimpleRNNOptions(*flags)


def _plain_cell(cell) -> bool:
    """A built GRU or SimpleRNN cell this kernel can step."""
    return (cell.kind in ("gru", "simple_rnn") and cell.built and support.activation_codes(cell) is not None
            and support.steps_in_weights_dtype(cell) and support.extension_ready())


def _steppable(x, kernel) -> bool:
    """x a plain [B >= 1, D] CPU tensor of the weights' dtype, D the kernel's."""
    return (type(x) is Tensor and x.dim() == 2 and x.shape[0] >= 1 and x.shape[1] == kernel.shape[0]
            and x.dtype is kernel.dtype and x.is_cpu and x.layout is torch.strided)


class CellCall:
    """The Keras cell call `out, [h] = cell(x_t, h)` as one T = 1 forward (with autograd: the eager
    autograd Function directly). A call it does not take (a conversion or an error to report,
    another kernel forced, masks drawn in training) returns None: the cell takes the full route."""

    __slots__ = ("draws", "call")

    def __init__(self, cell):
        self.draws = bool(cell.dropout or cell.recurrent_dropout)
        op, options = _op_and_options(cell)
        self.call = fused.Call(op, (None, None, None, None), options)

    def __call__(self, cell, x, states, training):
        if self.draws and (cell.training if training is None else training):
            return None
        if torch.is_autocast_enabled("cpu"):  # (the call computes in the region's dtype)
            return None
        forced = dispatch.forced_name()
        if forced and forced != name:
            return None
        if type(states) is list or type(states) is tuple:
            if len(states) != 1:
                return None
            states = states[0]
        params = cell._parameters
        kernel = params["kernel"]
        if not _steppable(x, kernel):
            return None
        if states is None:  # (the full route's zero state)
            h = x.new_zeros(x.shape[0], cell.units)
        elif (type(states) is Tensor and states.shape == (x.shape[0], cell.units) and states.dtype is x.dtype
              and states.is_cpu and states.layout is torch.strided):
            h = states
        else:
            return None
        inputs = (x[:, None, :], kernel, params["recurrent_kernel"], params["bias"], h)
        call = self.call
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            y, h = fused.Function.apply(call, *inputs)
        else:
            y, h = call.op.forward(inputs, call.fixed, call.options, False)
        return y, [h]


class StreamStep:
    """A stream's step: one T = 1 forward without saving, the state kept here (see dispatch.stream_step)."""

    __slots__ = ("op", "options", "weights", "batch_size", "h")

    def __init__(self, cell, batch_size: int):
        self.op, self.options = _op_and_options(cell)
        params = cell._parameters
        # views of the parameters: in-place updates are seen
        self.weights = tuple(None if params[n] is None else params[n].detach()
                             for n in ("kernel", "recurrent_kernel", "bias"))
        self.batch_size = batch_size
        self.h = self.weights[0].new_zeros(batch_size, cell.units)

    def step(self, x):
        if type(x) is Tensor and x.dim() == 1 and self.batch_size == 1:
            x = x[None]
        if not _steppable(x, self.weights[0]) or x.shape[0] != self.batch_size or x.requires_grad:
            return None
        y, self.h = self.op.forward((x[:, None, :], *self.weights, self.h), (None, None, None, None), self.options,
                                    False)
        return y

    def state(self) -> list:
        return [self.h.clone()]

    def set_state(self, h) -> None:
        self.h = h.to(self.weights[0].dtype).clone()


def cell_call(cell):
    return CellCall(cell) if _plain_cell(cell) else None


def stream_step(cell, batch_size: int):
    if not _plain_cell(cell) or not cell.kernel.is_cpu:
        return None
    return StreamStep(cell, batch_size)
