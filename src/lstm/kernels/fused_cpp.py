"""The C++ fused LSTM kernel (csrc/lstm.cpp, csrc/streaming.cpp; contract csrc/rnn.h), thin bindings here.

    training  xw = x @ kernel + b            one GEMM over [B*T, D] (dropout masks first)
              per step: z = xw_t + h @ R (MKL sgemm_/dgemm_, or a register loop for batch <= 4),
              gates, state and output fused in one vectorised pass (in place in xw: the saved gates)
    backward  per step (reverse): dZ_t from the saved gates, dh_{t-1} = dZ_t @ R^T;
              then dR = H_prev^T @ dZ, dkernel = x^T @ dZ, dx = dZ @ kernel^T, db = ΣdZ
    inference batch > 4: no [B,T,4U] buffer; per step one GEMM [x_t, h] @ [kernel; R]
              batch <= 4: as training, without saving; T == 1 (cell calls): one fused step
    cell call `cell(x_t, [h, c])`: `CellCall`, one C++ call (`cell_step`) that makes the layer's
              checks and runs that fused step (with autograd: the eager autograd Function
              directly), skipping the `Recurrence` and the dispatch
    batch <= 4 products: register tiles (csrc/small_gemm.h, AVX-512 where the CPU has it)

Threads: the recurrence is independent across batch rows, so with N threads each thread runs
the whole sequence for B/N rows (single-threaded BLAS inside): no synchronisation per step.
The big GEMMs outside the loop use MKL's threads.

Batch-major throughout ([B, T, *], the caller's layout; a step's rows are strided, which BLAS
takes as a leading dimension), so x, dx and the gates are never transposed or flipped.
Saved for the backward: the activated gates [B,T,4U] and the states before each step
(h and c, [B,T,U] each); tanh(c_t) is recomputed: 6·B·T·U values.

Supported: LSTM, CPU float32/float64, the named activations (tanh, sigmoid, relu, linear,
hard_sigmoid, hard_sigmoid_tf_keras), every option of a plain `Recurrence` (no LSTM variant).
bfloat16/float16 without dropout (problem.py, Recurrence: "Precision"): the per-step products on
AMX tiles in bfloat16 where the CPU has them (csrc/operand_right.h: the weights packed once per
call), else on MKL's bf16/f16 GEMMs, float32 accumulation either way (csrc/low_precision.h: on a CPU
without the type's instructions, float32's products of the widened operands); the recurrence in
float32 with h rounded at every step, the outputs, the saved h and the backward's dz in the low
precision (csrc/bindings/lstm_ops.cpp).

Per-row lengths (`Recurrence.lengths`, or a right-padded mask) and resets: the call runs packed
(packing.py, csrc/row_layout.h): only the rows' valid steps, gathered time-major with the rows
sorted by length (a reset starts a row of its own), so the input GEMM, each step and the
backward's products do work in proportion to the sum of the lengths; each thread takes every n-th
row, so the threads' shares stay even. Traces and torch.compile take the mask route instead (and
leave resets to the reference kernel).

Traces (`trace=True`): the training forward's saved buffers are the trace: the gates i, f, c̃, o
are views of the activated gates, c and h the states after each step (at a masked step the
step's own values, as the reference gives them, computed from the saved gates and state).
A call with a trace therefore runs the saving forward even without grad; a call without one
is unchanged. The traces are detached (no gradient flows back through them; the outputs and
states stay differentiable): for gradients through gate values use the reference kernel
(`lstm.kernels.use("reference")`).

Autograd, torch.compile and torch.export: `fused.FusedOp` (the custom ops are
lstm::fused_cpp_forward / lstm::fused_cpp_backward).

Capabilities besides `run`: the cell call (`cell_call`) and the streaming step (`stream_step`,
the C++ `LSTMStep`: [kernel; recurrent_kernel] packed in panels of 32 units (16 in float64) for
one register-tiled pass over contiguous memory per step; big steps split the panels over the
threads; it re-reads the weights when a parameter's in-place version changes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch, fused, native, packing, support
from .problem import Recurrence, RecurrenceResult, answers_empty_sequences, state_dtype

name = "fused_cpp"
takes_lengths = True
takes_resets = True  # (packed: packing.py)


def supports(p: Recurrence) -> bool:
    return (p.plain and p.cell.kind == "lstm" and (p.bias is None or p.bias.dim() == 1)
            and support.activation_codes(p.cell) is not None
            and (support.on_cpu_in_one_float_dtype(p) or support.on_cpu_in_low_precision(p, dropout=False))
            and (p.reset is None or packing.can_pack(p, packable=not p.trace)) and support.extension_ready())


class Options(NamedTuple):
    """The C++ forward's and backward's options, in their order."""

    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    activation: int
    recurrent_activation: int


class LSTMOp(fused.FusedOp):
    """forward -> y, hT, cT, then with save the activated gates G [B,T,4U] and the states before
    each step Hp, Cp [B,T,U]."""

    name = "fused_cpp"
    input_names = ("x", "kernel", "recurrent_kernel", "bias", "h0", "c0")
    fixed_names = ("input_dropout", "recurrent_dropout", "mask", "batch_sizes")
    output_count = 3
    Options = Options

    def forward(self, inputs, fixed, options, save):
        return native.module.forward(*inputs, *fixed, *options, save)

    def backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite):
        x, kernel, recurrent_kernel = inputs[:3]
        grads = native.module.backward(*output_grads, x, kernel, recurrent_kernel, *saved, *fixed, *options, needs)
        return fused.in_input_dtypes(grads, inputs)  # (in bfloat16/float16 some come in float32)

    def forward_shapes(self, inputs, fixed, options, save):
        x, recurrent_kernel, h0 = inputs[0], inputs[2], inputs[4]
        (rows, columns, _), units, batch = x.shape, recurrent_kernel.shape[0], h0.shape[0]  # (packed: x [N, 1, D])
        outputs = (rows, columns, units) if options.return_sequences else (batch, units)
        shapes = [outputs, (batch, units), (batch, units)]
        return shapes + [(rows, columns, 4 * units), (rows, columns, units), (rows, columns, units)] if save else shapes

    def forward_dtypes(self, inputs, fixed, options, save):
        compute = inputs[0].dtype
        state = state_dtype(compute)  # C, the gates G and C_{t-1}: float32 in bfloat16/float16
        return [compute, compute, state] + [state, compute, state] if save else [compute, compute, state]


OP = LSTMOp()


def _trace(p: Recurrence, G: Tensor, Hp: Tensor, Cp: Tensor, hT: Tensor, cT: Tensor) -> dict:
    """The reference's per-step internals, in processing order, from the saving forward's
    buffers: G the activated gates [B,T,4U], Hp/Cp the states before the step of each time index."""
    G, Hp, Cp, hT, cT = (t.detach().to(state_dtype(t.dtype)) for t in (G, Hp, Cp, hT, cT))  # (float32 in bf16/f16)
    mask = p.mask
    if p.go_backwards:
        G, Hp, Cp = G.flip(1), Hp.flip(1), Cp.flip(1)
        mask = None if mask is None else mask.flip(1)
    i, f, c_tilde, o = G.chunk(4, dim=-1)
    c = torch.cat([Cp[:, 1:], cT[:, None]], dim=1)  # the state after each step
    h = torch.cat([Hp[:, 1:], hT[:, None]], dim=1)
    if mask is not None:  # a masked step kept the state; its trace is the step's own values
        from .. import activations

        keep = mask[:, :, None].to(torch.bool)
        c_step = f * Cp + i * c_tilde
        c = torch.where(keep, c, c_step)
        h = torch.where(keep, h, o * activations.get(p.cell.activation)(c_step))
    return {"i": i, "f": f, "c_tilde": c_tilde, "c": c, "o": o, "h": h}


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    p, lengths = packing.route(p, packable=not p.trace)
    if lengths is not None:
        return _run_packed(p, lengths)
    options = Options(bool(p.go_backwards), bool(p.zero_output_for_mask), bool(p.return_sequences),
                      *support.activation_codes(p.cell))
    inputs = (p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state)
    fixed = (p.input_dropout, p.recurrent_dropout, p.mask, None)
    (y, hT, cT), saved = OP.call(inputs, fixed, options, keep_saved=p.trace)
    return RecurrenceResult(y, (hT, cT), _trace(p, *saved, hT, cT) if p.trace else None)


def _run_packed(p: Recurrence, lengths: Tensor) -> RecurrenceResult:
    """The call on the rows' valid steps only (packing.py)."""
    options = Options(False, False, bool(p.return_sequences), *support.activation_codes(p.cell))

    def call(x, states, input_dropout, recurrent_dropout, batch_sizes):
        inputs = (x, p.kernel, p.recurrent_kernel, p.bias, *states)
        return OP.call(inputs, (input_dropout, recurrent_dropout, None, batch_sizes), options)[0]

    return packing.run_packed(p, lengths, call)


class CellCall:
    """The Keras cell call `out, [h, c] = cell(x_t, [h, c])` of a plain LSTM cell as one C++ call
    (`cell_step`), skipping the `Recurrence` and the dispatch. What does not change between calls
    (the activation codes, whether the cell draws random masks in training) is kept here; the
    cell drops it when an attribute or a weight is set. Every per-call check of the full route is
    made in C++ on the tensors as they are. Without autograd the C++ call is the step (the one the
    full route runs for T == 1); with it, the eager autograd Function runs directly, as the full
    route runs it. A call it does not take (a conversion or an error to report, another kernel
    forced, masks drawn in training) returns None, and the cell takes the full route, which
    computes the same numbers or raises its error."""

    __slots__ = ("codes", "draws", "call")

    def __init__(self, cell, codes: tuple[int, int]):
        self.codes = codes
        # dropout masks, and the LSTM cell's training-only zoneout and DropConnect
        self.draws = bool(cell.dropout or cell.recurrent_dropout or getattr(cell, "recurrent_dropconnect", 0)
                          or any(getattr(cell, "zoneout", ())))
        # one step, the last output, no mask, no trace: one call object serves every call
        self.call = fused.Call(OP, (None, None, None, None), Options(False, False, False, *codes))

    def __call__(self, cell, x, states, training):
        if self.draws and (cell.training if training is None else training):
            return None
        if torch.is_autocast_enabled("cpu"):  # (the call computes in the region's dtype)
            return None
        forced = dispatch.forced_name()
        if forced and forced != name:
            return None
        if states is None:
            h = c = None
        elif type(states) is list or type(states) is tuple:
            if len(states) != 2:
                return None
            h, c = states
            if type(h) is not Tensor or type(c) is not Tensor:
                return None
        else:
            return None
        params = cell._parameters
        kernel, recurrent_kernel, bias = params["kernel"], params["recurrent_kernel"], params["bias"]
        out = native.module.cell_step(x, h, c, kernel, recurrent_kernel, bias, *self.codes)
        if len(out) == 3:
            return out[0], out[1:]
        if not out:
            return None
        if h is None:  # (the full route's zero states)
            h, c = x.new_zeros(x.shape[0], cell.units), x.new_zeros(x.shape[0], cell.units)
        y, h, c = fused.Function.apply(self.call, x[:, None, :], kernel, recurrent_kernel, bias, h, c)
        return y, [h, c]


def _plain_lstm_codes(cell):
    """The activation codes of a built plain LSTM cell this kernel can step, else None."""
    if (cell.kind != "lstm" or not cell.built or not cell.cell_spec().plain or not support.steps_in_weights_dtype(cell)
            or not support.extension_ready()):
        return None
    return support.activation_codes(cell)


def cell_call(cell):
    codes = _plain_lstm_codes(cell)
    return None if codes is None else CellCall(cell, codes)


def stream_step(cell, batch_size: int):
    codes = _plain_lstm_codes(cell)
    if codes is None or not cell.kernel.is_cpu:
        return None
    return native.module.LSTMStep(cell.kernel, cell.recurrent_kernel, cell.bias, batch_size, *codes)
