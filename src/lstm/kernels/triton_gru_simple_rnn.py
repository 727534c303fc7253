"""The GRU and the SimpleRNN on the GPU where cuDNN cannot run them (torch_rnn.py runs what it can):
every mask, recurrent dropout, input dropout per gate, reset_after=False, Keras' activations, in
float32, float64, bfloat16 and float16.

Per call: one GEMM projects every step's input (x @ kernel + the input bias, dropout masks first).
Then per step, in processing order, torch's GEMMs do the products with recurrent_kernel (the
recurrent dropout masks first) and Triton programs (triton_gru_steps.py) the rest of the step:

    SimpleRNN            z[s] += h @ U; a program: the activation, h, the mask, the output
    GRU reset_after      hr[s] = h @ U; a program: z, r, h_tilde = act(x_h + r * (h U_h + b_h)), ...
    GRU not reset_after  h @ U_{z|r}; a program: z, r and r * h; (r * h) @ U_h; a program: h_tilde, ...

The backward is hand-derived, in the same shape: per reverse step the programs turn the saved
activations into their pre-activations' gradients and GEMMs carry them to h_{s-1}; after the loop
GEMMs give the gradients of the kernels and the inputs (deterministic: no atomics).

bfloat16/float16 follow the rules of problem.py's Recurrence ("Precision"), as triton_lstm.py:
the recurrence in float32 on operands rounded to the compute dtype, h (and GRU's r * h, a
product's operand) rounded at every step (`fused.RoundedOperandsOp`). Autograd, torch.compile and
torch.export: `fused.FusedOp` (the custom ops are lstm::triton_gru_simple_rnn_forward / _backward).

It runs on CUDA tensors; under Triton's interpreter (TRITON_INTERPRET=1) also CPU tensors when
forced (`lstm.kernels.use("triton_gru_simple_rnn")`). Resets (`Recurrence.reset`) restore the
state before the products of their step. Traces come from the activations the forward saves and
each step's own h, which its programs write when asked (detached).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from . import fused, support
from .input_projection import input_projection_backward
from .problem import Recurrence, RecurrenceResult, answers_empty_sequences
from .triton_support import (ROUND_H, add_recurrent_gradient, blocks, on_device, or_placeholder, output_gradients,
                             project, recurrent_product, recurrent_weight_gradient, restore, restore_backward,
                             rounded, run_or_fall_back, runs, starts, writable)

name = "triton_gru_simple_rnn"
takes_resets = True


def _keras_bias(p: Recurrence) -> bool:
    """No bias, or Keras' shape: [2, 3U] for a reset_after GRU, else [G*U]."""
    if p.bias is None:
        return True
    two_rows = p.cell.kind == "gru" and p.cell.reset_after
    return p.bias.shape == ((2, p.kernel.shape[1]) if two_rows else (p.kernel.shape[1],))


def supports(p: Recurrence) -> bool:
    return (p.cell.kind in ("gru", "simple_rnn") and _keras_bias(p)
            and support.activation_codes(p.cell) is not None and runs(p, name))


class Options(NamedTuple):
    """The options of a call."""

    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    simple_rnn: bool  # else a GRU
    reset_after: bool  # (a GRU's)
    activation: int
    recurrent_activation: int
    trace: bool


def _steps():
    """The Triton programs (importing triton once, on first use)."""
    from . import triton_gru_steps
    return triton_gru_steps


def _reset_before_parts(R: torch.Tensor, rd: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple:
    """A GRU without reset_after: (U_z|r, U_h, the z|r blocks' recurrent dropout masks or None,
    the h block's mask [B, U] or `placeholder` for the programs)."""
    units = R.shape[0]
    masks = (None, placeholder) if rd is None else (rd[:2], rd[2].contiguous())
    return R[:, :2 * units], R[:, 2 * units:], *masks


class TritonGRUSimpleRNNOp(fused.RoundedOperandsOp):
    """forward -> Y, hT, then (with save) the buffers of triton_gru_steps.py: z (the activations),
    the GRU's recurrent buffer (reset_after: hr [T, B, 3U]; else rh [T, B, U]; SimpleRNN: none)
    and h of every step; then with trace each step's own h (trace_h [T, B, U])."""

    name = "triton_gru_simple_rnn"
    input_names = ("x", "kernel", "bias", "recurrent_kernel", "h0", "reset_h")
    # reset: bool [B, T] by time index, the steps that count only; reset_h: the state it restores
    # (None: zeros)
    fixed_names = ("input_dropout", "recurrent_dropout", "mask", "reset")
    output_count = 2
    Options = Options
    overwrites_saved = True  # z and hr: the activations, then their gradients
    needs_extension = False

    def float32_forward(self, inputs, fixed, options, save, low):
        x, kernel, bias, R, h0, reset_h = inputs
        in_drop, rd, mask, reset = fixed
        B, T, _ = x.shape
        U, G = h0.shape[1], 1 if options.simple_rnn else 3
        steps = _steps()
        x_in_order = x.flip(1) if options.go_backwards else x
        z = project(x_in_order.transpose(0, 1), kernel, in_drop, G, low)  # [T, B, GU]
        if bias is not None:
            z += bias[0] if bias.dim() == 2 else bias  # (reset_after: the input row)
        h = x.new_empty(T + 1, B, U)
        h[0] = h0
        y = x.new_empty(T, B, U)
        block_b, block_u, grid = blocks(B, U)
        tile = dict(BLOCK_B=block_b, BLOCK_U=block_u)
        round_h = ROUND_H.get(low, 0)
        flags = dict(HAS_MASK=mask is not None, ZERO_OUTPUT=options.zero_output_for_mask, ROUND_H=round_h,
                     TRACE=options.trace, **tile)
        given = or_placeholder(z)
        mask = given(mask)
        recurrent = None  # (SimpleRNN: no recurrent buffer)
        trace_h = x.new_empty(T, B, U) if options.trace else None  # (each step's own h, before the mask)
        traced = given(trace_h)
        with on_device(x):
            if options.simple_rnn:
                for s in range(T):
                    t = T - 1 - s if options.go_backwards else s
                    restore(h[s], starts(reset, t), reset_h)
                    if rd is None:
                        z[s].addmm_(h[s], R)
                    else:
                        z[s] += recurrent_product(h[s], R, rd, low)
                    steps.simple_rnn_forward_step[grid](z, h, y, mask, traced, s, t, B, U, T,
                                                        ACTIVATION=options.activation, **flags)
            elif options.reset_after:
                recurrent = x.new_empty(T, B, 3 * U)  # hr
                recurrent_bias = given(None if bias is None else bias[1].contiguous())
                for s in range(T):
                    t = T - 1 - s if options.go_backwards else s
                    restore(h[s], starts(reset, t), reset_h)
                    recurrent[s] = recurrent_product(h[s], R, rd, low)
                    steps.gru_forward_step[grid](z, recurrent, h, y, mask, recurrent_bias, traced, s, t, B, U, T,
                                                 RESET_AFTER=True, HAS_RECURRENT_BIAS=bias is not None,
                                                 ACTIVATION=options.activation,
                                                 RECURRENT_ACTIVATION=options.recurrent_activation, **flags)
            else:
                recurrent = x.new_empty(T, B, U)  # rh
                R_zr, R_h, rd_zr, keep_h_block = _reset_before_parts(R, rd, z)
                for s in range(T):
                    t = T - 1 - s if options.go_backwards else s
                    restore(h[s], starts(reset, t), reset_h)
                    zr = recurrent_product(h[s], R_zr, rd_zr, low)
                    steps.gru_reset_step[grid](z, zr, h, recurrent, keep_h_block, s, B, U,
                                               RECURRENT_ACTIVATION=options.recurrent_activation,
                                               HAS_RECURRENT_DROPOUT=rd is not None, ROUND_H=round_h, **tile)
                    candidate = recurrent[s] @ R_h
                    steps.gru_forward_step[grid](z, candidate, h, y, mask, z, traced, s, t, B, U, T, RESET_AFTER=False,
                                                 HAS_RECURRENT_BIAS=False, ACTIVATION=options.activation,
                                                 RECURRENT_ACTIVATION=options.recurrent_activation, **flags)
        outputs = y.transpose(0, 1).contiguous() if options.return_sequences else y[T - 1]
        saved = (z, recurrent, h) if save else (None, None, None)
        return [outputs, h[T].clone(), *saved, trace_h]

    def forward_shapes(self, inputs, fixed, options, save):
        x, h0 = inputs[0], inputs[4]
        (B, T, _), U = x.shape, h0.shape[1]
        shapes = [(B, T, U) if options.return_sequences else (B, U), (B, U)]
        if not save:
            shapes += [(0,)] * 3
        elif options.simple_rnn:
            shapes += [(T, B, U), (0,), (T + 1, B, U)]
        else:
            shapes += [(T, B, 3 * U), (T, B, 3 * U) if options.reset_after else (T, B, U), (T + 1, B, U)]
        return shapes + [(T, B, U) if options.trace else (0,)]

    def float32_backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite, low):
        x, kernel, bias, R, h0, reset_h = inputs
        in_drop, rd, mask, reset = fixed
        z, recurrent, h = saved[:3]  # (then the trace, if any)
        if not overwrite:
            z = z.clone()
            recurrent = recurrent.clone() if options.reset_after else recurrent  # (rh is only read)
        dy, dhT = output_grads
        B, T, _ = x.shape
        U, G = h0.shape[1], 1 if options.simple_rnn else 3
        steps = _steps()
        dh = x.new_zeros(B, U) if dhT is None else writable(dhT, x.dtype)
        carry = x.new_zeros(B, U)
        d_reset_h = x.new_zeros(B, U) if reset is not None else None
        dy_steps, dy_stride_s, dy_stride_b = output_gradients(dy, options.return_sequences, z)
        block_b, block_u, grid = blocks(B, U)
        flags = dict(ACTIVATION=options.activation, HAS_MASK=mask is not None,
                     ZERO_OUTPUT=options.zero_output_for_mask, BLOCK_B=block_b, BLOCK_U=block_u)
        mask = or_placeholder(z)(mask)

        def time_index(s: int) -> int:
            return T - 1 - s if options.go_backwards else s

        def step_arguments(s: int) -> tuple:
            """A backward program's arguments from s to HAS_DY (whether y[s] has a gradient)."""
            has_dy = dy is not None and (options.return_sequences or s == T - 1)
            return s, time_index(s), B, U, T, dy_stride_s, dy_stride_b, has_dy

        gru = dict(RECURRENT_ACTIVATION=options.recurrent_activation, RESET_AFTER=options.reset_after, **flags)
        with on_device(x):
            if options.simple_rnn:
                for s in reversed(range(T)):
                    steps.simple_rnn_backward_step[grid](z, dy_steps, dh, carry, mask, *step_arguments(s), **flags)
                    add_recurrent_gradient(dh, z[s], R, rd)
                    restore_backward(dh, starts(reset, time_index(s)), d_reset_h)
            elif options.reset_after:
                for s in reversed(range(T)):
                    steps.gru_backward_step[grid](z, recurrent, h, dy_steps, dh, carry, mask, *step_arguments(s), **gru)
                    add_recurrent_gradient(dh, recurrent[s], R, rd)
                    restore_backward(dh, starts(reset, time_index(s)), d_reset_h)
            else:
                R_zr, R_h, rd_zr, keep_h_block = _reset_before_parts(R, rd, z)
                for s in reversed(range(T)):
                    steps.gru_backward_step[grid](z, recurrent, h, dy_steps, dh, carry, mask, *step_arguments(s), **gru)
                    drh = z[s, :, 2 * U:] @ R_h.T
                    steps.gru_reset_backward_step[grid](z, drh, h, dh, keep_h_block, s, B, U,
                                                        RECURRENT_ACTIVATION=options.recurrent_activation,
                                                        HAS_RECURRENT_DROPOUT=rd is not None, BLOCK_B=block_b,
                                                        BLOCK_U=block_u)
                    add_recurrent_gradient(dh, z[s, :, :2 * U], R_zr, rd_zr)
                    restore_backward(dh, starts(reset, time_index(s)), d_reset_h)
        dz = z.view(T * B, G * U)
        h_steps = h[:T]
        if options.simple_rnn:
            dR = recurrent_weight_gradient(h_steps, dz, rd, low)
        elif options.reset_after:
            dR = recurrent_weight_gradient(h_steps, recurrent.view(T * B, 3 * U), rd, low)
        else:  # (rh: the candidate product's operand, mask and rounding included)
            dR = torch.cat([recurrent_weight_gradient(h_steps, dz[:, :2 * U], None if rd is None else rd[:2], low),
                            recurrent.view(T * B, U).T @ dz[:, 2 * U:]], dim=1)
        d_bias = None
        if bias is not None:
            d_bias = dz.sum(0)
            if bias.dim() == 2:  # (the recurrent row's gradient: hr's)
                d_bias = torch.stack([d_bias, recurrent.view(T * B, 3 * U).sum(0)])
        x_in_order = x.flip(1) if options.go_backwards else x
        dx, dkernel = input_projection_backward(x_in_order, kernel, in_drop, z.transpose(0, 1), needs[0], needs[1],
                                                functools.partial(rounded, low=low))
        if dx is not None and options.go_backwards:
            dx = dx.flip(1)
        return dx, dkernel, d_bias, dR, dh, d_reset_h


OP = TritonGRUSimpleRNNOp()


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    return run_or_fall_back(name, _run, p)


def _run(p: Recurrence) -> RecurrenceResult:
    cell = p.cell
    options = Options(bool(p.go_backwards), bool(p.zero_output_for_mask), bool(p.return_sequences),
                      cell.kind == "simple_rnn", cell.kind == "gru" and bool(cell.reset_after),
                      *support.activation_codes(cell), bool(p.trace))
    mask = None if p.mask is None else p.mask.to(torch.bool).contiguous()
    reset = p.reset if p.reset is None or mask is None else p.reset & mask  # (ignored at steps that do not count)
    fixed = (p.input_dropout, p.recurrent_dropout, mask, reset)
    reset_h = p.reset_state[0] if p.reset is not None and p.reset_state is not None else None
    inputs = (p.inputs, p.kernel, p.bias, p.recurrent_kernel, p.initial_state[0], reset_h)
    (y, hT), saved = OP.call(inputs, fixed, options, keep_saved=p.trace)
    return RecurrenceResult(y, (hT,), _trace(p, saved) if p.trace else None)


def _trace(p: Recurrence, saved: list) -> dict:
    """The reference's trace, in processing order [B, T, *], detached: each step's own h (before
    the mask), and a GRU's gates from the activations the forward saved."""
    h = saved[3].detach().transpose(0, 1)
    if p.cell.kind == "simple_rnn":
        return {"h": h}
    z, r, h_tilde = saved[0].detach().transpose(0, 1).split(p.units, dim=-1)
    return {"z": z, "r": r, "h_tilde": h_tilde, "h": h}
