"""The plain cells on PyTorch's own fused RNN ops (torch._VF.lstm, gru, rnn_tanh, rnn_relu: cuDNN on
CUDA, MIOpen on ROCm, oneDNN or ATen's loop on the CPU), for the calls that fit them exactly:
Keras' own cuDNN conditions.

    LSTM       activation tanh, recurrent_activation sigmoid, bias [4U] or none (gates i|f|c|o are
               torch's i|f|g|o: W_ih = kernel.T, W_hh = recurrent_kernel.T, b_ih = bias, b_hh = 0)
    GRU        reset_after=True (torch's n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), the same
               activations, bias [2, 3U] or none; Keras' z|r|h blocks reordered to torch's r|z|n
    SimpleRNN  activation tanh or relu

and no trace, no recurrent dropout, input dropout shared by the gates (applied to x first), and
steps that count first in each row (no mask, lengths, a right-padded mask, resets): those run
packed (packing.py), which is torch's PackedSequence layout, so a call with lengths or resets is
one op on the rows' valid steps; Keras' rules for the outputs at padded steps are applied after.
go_backwards: the reversed steps run forwards (Keras returns outputs in processing order).

Float32 and float64 (cuDNN computes float32 in TF32 where torch.backends.cudnn.allow_tf32 says).
On a GPU bfloat16 and float16 too, as torch.nn.LSTM runs them under autocast: the weights and the
states rounded to the compute dtype, cuDNN's numerics (products accumulated in float32; between
its steps cuDNN may hold C in the compute dtype where problem.py's rules keep float32: a
difference within a few of the dtype's roundings); C comes back in float32 holding those values.
On the CPU the C++ kernels are faster and are chosen first; this kernel is what a CUDA tensor gets
(low precision on the CPU only when forced: the tests, on torch's CPU ops).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import packing, support
from .dispatch import forced_name
from .problem import LOW_PRECISION, Recurrence, RecurrenceResult, answers_empty_sequences, state_dtype
from .reference import autocast_off

name = "torch_rnn"
takes_lengths = True
takes_resets = True  # (packed: packing.py)

GATE_ACTIVATIONS = {"lstm": ("tanh", "sigmoid"), "gru": ("tanh", "sigmoid")}
SIMPLE_RNN_OPS = {"tanh": torch._VF.rnn_tanh, "relu": torch._VF.rnn_relu}


def supports(p: Recurrence) -> bool:
    cell = p.cell
    # (torch.compile: Dynamo does not trace torch's RNN ops; a compiled call takes a kernel it traces)
    if torch.compiler.is_compiling() or not cell.plain or p.trace or p.recurrent_dropout is not None:
        return False
    if cell.kind == "simple_rnn":
        if cell.activation not in SIMPLE_RNN_OPS:
            return False
    elif (cell.activation, cell.recurrent_activation) != GATE_ACTIVATIONS[cell.kind]:
        return False
    if cell.kind == "gru" and not (cell.reset_after and (p.bias is None or p.bias.dim() == 2)):
        return False
    if cell.kind != "gru" and p.bias is not None and p.bias.dim() != 1:
        return False
    if p.input_dropout is not None and p.input_dropout.shape[0] != 1:
        return False
    if not support.on_one_device_in_compute_dtypes(p):
        return False
    if p.inputs.dtype in LOW_PRECISION and not (p.inputs.is_cuda or forced_name() == name):
        return False  # (bfloat16/float16 on the CPU: the C++ kernels run them; forced, the tests)
    if p.mask is None and p.lengths is None and p.reset is None:
        return True
    return packing.can_pack(p) and support.extension_ready()


def _weights(p: Recurrence) -> list:
    """torch's flat weights of one layer, one direction: W_ih, W_hh (, b_ih, b_hh)."""
    kernel, recurrent, bias = p.kernel, p.recurrent_kernel, p.bias
    if p.cell.kind == "gru":  # Keras z|r|h -> torch r|z|n
        def reordered(t: Tensor) -> Tensor:
            z, r, h = t.chunk(3, dim=-1)
            return torch.cat([r, z, h], dim=-1)

        kernel, recurrent = reordered(kernel), reordered(recurrent)
        biases = [] if bias is None else [reordered(bias[0]), reordered(bias[1])]
    else:
        biases = [] if bias is None else [bias, torch.zeros_like(bias)]
    dtype = p.inputs.dtype  # (a mixed policy's float32 weights: rounded to the compute dtype)
    return [t.to(dtype) for t in (kernel.t().contiguous(), recurrent.t().contiguous(), *biases)]


def _op(p: Recurrence, x: Tensor, batch_sizes: Optional[Tensor], states: tuple, training: bool) -> tuple:
    """(outputs, *final states) of torch's op: x [B, T, D] batch-first, or packed [N, D] with batch_sizes."""
    weights = _weights(p)
    layout = (batch_sizes,) if batch_sizes is not None else ()
    tail = (len(weights) == 4, 1, 0.0, training, False) + (() if batch_sizes is not None else (True,))
    hidden = tuple(s[None].to(x.dtype) for s in states)
    with autocast_off(x.device.type):  # (the casts are made here)
        if p.cell.kind == "lstm":
            y, h, c = torch._VF.lstm(x, *layout, hidden, weights, *tail)
            return y, h[0], c[0].to(state_dtype(x.dtype))
        op = torch._VF.gru if p.cell.kind == "gru" else SIMPLE_RNN_OPS[p.cell.activation]
        y, h = op(x, *layout, hidden[0], weights, *tail)
    return y, h[0]


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    p, lengths = packing.route(p)
    if lengths is not None:
        def call(x, states, input_dropout, recurrent_dropout, batch_sizes):  # (recurrent_dropout: None here)
            return _packed(p, x, states, input_dropout, batch_sizes)

        return packing.run_packed(p, lengths, call)
    x = p.inputs if p.input_dropout is None else p.inputs * p.input_dropout[0][:, None, :].to(p.inputs.dtype)
    if p.go_backwards:
        x = x.flip(1)
    y, *states = _op(p, x, None, tuple(p.initial_state), torch.is_grad_enabled())
    return RecurrenceResult(y if p.return_sequences else states[0], tuple(states))


def _packed(p: Recurrence, x: Tensor, states: tuple, input_dropout: Optional[Tensor], batch_sizes: Tensor) -> tuple:
    """packing.run_packed's call: x [N, 1, D] and input_dropout [1, N, D] per packed row."""
    rows = x.view(x.shape[0], x.shape[2])
    if input_dropout is not None:
        rows = rows * input_dropout[0].to(rows.dtype)
    y, *final = _op(p, rows, batch_sizes, states, torch.is_grad_enabled())
    return (y[:, None, :], *final)
