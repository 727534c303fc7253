"""The LSTM on the GPU where cuDNN cannot run it (torch_rnn.py runs what it can): every mask,
recurrent dropout, zoneout and the variants (peephole, layer_norm, proj_size, coupled,
forget_bias, cell_clip), with Keras' activations, in float32, float64, bfloat16 and float16.

Per call: one GEMM projects every step's input (x @ kernel + bias, dropout masks first; with
layer norm, normalised for all steps at once). Then per step, in processing order: torch's GEMM
adds h_{s-1} @ recurrent_kernel (the recurrent dropout masks first) to that step's
pre-activations, and one Triton program (triton_steps.py) does the rest of the step: the layer
norms, the gates, C, h, the mask, zoneout, the output (with a projection: a GEMM and a second
program for h). The backward is hand-derived, in the same shape: per reverse step a Triton program
turns the saved gates into their pre-activations' gradients and a GEMM carries them to h_{s-1};
after the loop GEMMs give the gradients of the weights and the inputs, and sums those of the
biases, gains and peepholes (haste's structure, without atomics: deterministic).

bfloat16/float16 follow the rules of problem.py's Recurrence ("Precision"): the recurrence in
float32 on operands rounded to the compute dtype, h rounded at every step
(`fused.RoundedOperandsOp`). Autograd, torch.compile and torch.export: `fused.FusedOp` (the custom
ops are lstm::triton_lstm_forward / lstm::triton_lstm_backward).

It runs on CUDA tensors. Under Triton's interpreter (TRITON_INTERPRET=1) it also runs CPU tensors
when forced (`lstm.kernels.use("triton_lstm")`): how the tests check it without a GPU. Resets
(`Recurrence.reset`) restore the states before the GEMM of their step. Traces come from the gates
the forward saves and each step's own h and C, which its programs write when asked (detached).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import fused, support
from .input_projection import bias_with_forget_bias, input_projection_backward
from .problem import Recurrence, RecurrenceResult, answers_empty_sequences
from .reference import LAYER_NORM_EPS
from .triton_support import (ROUND_H, add_recurrent_gradient, blocks, on_device, or_placeholder, output_gradients,
                             project, recurrent_product, recurrent_weight_gradient, restore, restore_backward,
                             rounded, run_or_fall_back, runs, starts, writable)

name = "triton_lstm"
takes_resets = True


def supports(p: Recurrence) -> bool:
    return p.cell.kind == "lstm" and support.activation_codes(p.cell) is not None and runs(p, name)


class Options(NamedTuple):
    """The options of a call (cell_clip -1: none)."""

    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    coupled: bool
    activation: int
    recurrent_activation: int
    cell_clip: float
    trace: bool


def _steps():
    """The Triton programs (importing triton once, on first use)."""
    from . import triton_steps
    return triton_steps


class TritonLSTMOp(fused.RoundedOperandsOp):
    """The inputs of a variant that is off are None; forward -> Y, hT, cT, then (with save) the
    buffers of triton_steps.py: z (the activated gates), h, c; with layer norm a, rstd_h and the
    normalised x W with its rows' 1/std; with a projection m; then with trace each step's own h and
    C (trace_h, trace_c)."""

    name = "triton_lstm"
    input_names = ("x", "kernel", "gate_gain", "bias", "recurrent_kernel", "peephole", "cell_gain", "cell_shift",
                   "projection", "h0", "c0", "reset_h", "reset_c")
    # reset: bool [B, T] by time index, the steps that count only; reset_h, reset_c: the states it
    # restores (None: zeros)
    fixed_names = ("input_dropout", "recurrent_dropout", "mask", "keep_h", "keep_c", "reset")
    output_count = 3
    Options = Options
    overwrites_saved = True  # z and a: the gates and products, then their gradients
    needs_extension = False

    def float32_forward(self, inputs, fixed, options, save, low):
        x, kernel, gate_gain, bias, R, peephole, cell_gain, cell_shift, P, h0, c0, reset_h, reset_c = inputs
        in_drop, rd, mask, keep_h, keep_c, reset = fixed
        (B, T, _), U, N = x.shape, c0.shape[1], h0.shape[1]
        G, layer_norm = (3 if options.coupled else 4), gate_gain is not None
        steps = _steps()
        x_in_order = x.flip(1) if options.go_backwards else x
        z = project(x_in_order.transpose(0, 1), kernel, in_drop, G, low)  # [T, B, GU]
        x_normalized = rstd_x = a = rstd_h = m = None
        if layer_norm:
            x_normalized, rstd_x = _layer_norm(z)
            a, rstd_h = x.new_empty(T, B, G * U), x.new_empty(T, B)
            z = x_normalized * gate_gain[0]
        if bias is not None:
            z += bias
        h, c, y = x.new_empty(T + 1, B, N), x.new_empty(T + 1, B, U), x.new_empty(T, B, N)
        h[0], c[0] = h0, c0
        if P is not None:
            m, projected = x.new_empty(T, B, U), x.new_empty(B, N)
        trace_h, trace_c = (x.new_empty(T, B, N), x.new_empty(T, B, U)) if options.trace else (None, None)
        clip, cell_blocks, output_blocks, flags, cell_flags = self._launch_settings(
            x, options, mask, keep_h, keep_c, peephole, layer_norm, U, N)
        given = or_placeholder(z)
        with on_device(x):
            for s in range(T):
                t = T - 1 - s if options.go_backwards else s
                starting = starts(reset, t)  # (an episode starts: the step begins from the restored states)
                restore(h[s], starting, reset_h)
                restore(c[s], starting, reset_c)
                # z[s] += h[s] @ R, or with layer norm a[s] = h[s] @ R (normalised by the program)
                if layer_norm:
                    a[s] = recurrent_product(h[s], R, rd, low)
                elif rd is None:
                    z[s].addmm_(h[s], R)
                else:
                    z[s] += recurrent_product(h[s], R, rd, low)
                steps.lstm_forward_step[cell_blocks[2]](
                    z, given(a), given(rstd_h), h, c, given(m), y, given(mask), given(keep_h), given(keep_c),
                    given(peephole), given(gate_gain), given(cell_gain), given(cell_shift), clip, given(trace_h),
                    given(trace_c), s, t, B, U, T, LAYER_NORM=layer_norm, PROJECTED=P is not None,
                    ROUND_H=ROUND_H.get(low, 0), TRACE=options.trace, BLOCK_B=cell_blocks[0], BLOCK_U=cell_blocks[1],
                    **flags, **cell_flags)
                if P is not None:
                    torch.mm(m[s], P, out=projected)
                    steps.lstm_output_step[output_blocks[2]](
                        projected, h, y, given(mask), given(keep_h), given(trace_h), s, t, B, N, T,
                        ROUND_H=ROUND_H.get(low, 0), TRACE=options.trace, BLOCK_B=output_blocks[0],
                        BLOCK_U=output_blocks[1], **flags)
        outputs = y.transpose(0, 1).contiguous() if options.return_sequences else y[T - 1]
        saved = (z, h, c, a, rstd_h, x_normalized, rstd_x, m) if save else (None,) * SAVED_COUNT
        return [outputs, h[T].clone(), c[T].clone(), *saved, trace_h, trace_c]

    def forward_shapes(self, inputs, fixed, options, save):
        x, gate_gain, P, h0, c0 = inputs[0], inputs[2], inputs[8], inputs[9], inputs[10]  # (then the reset states)
        (B, T, _), U, N = x.shape, c0.shape[1], h0.shape[1]
        GU = (3 if options.coupled else 4) * U
        layer_norm = gate_gain is not None

        def shape(*dims, on=True):
            return dims if on and save else (0,)

        saved = [shape(T, B, GU), shape(T + 1, B, N), shape(T + 1, B, U), shape(T, B, GU, on=layer_norm),
                 shape(T, B, on=layer_norm), shape(T, B, GU, on=layer_norm), shape(T, B, on=layer_norm),
                 shape(T, B, U, on=P is not None)]
        traces = [(T, B, N), (T, B, U)] if options.trace else [(0,), (0,)]
        return [(B, T, N) if options.return_sequences else (B, N), (B, N), (B, U), *saved, *traces]

    @staticmethod
    def _launch_settings(x, options, mask, keep_h, keep_c, peephole, layer_norm: bool, U: int, N: int) -> tuple:
        """What every launch of a call shares: (cell_clip as a tensor, the cell programs' blocks and
        grid, the output programs', the flags for h and the outputs, the cell programs' further flags)."""
        B = x.shape[0]
        flags = dict(HAS_MASK=mask is not None, HAS_KEEP_H=keep_h is not None,
                     ZERO_OUTPUT=options.zero_output_for_mask)
        cell_flags = dict(COUPLED=options.coupled, ACTIVATION=options.activation,
                          RECURRENT_ACTIVATION=options.recurrent_activation, HAS_PEEPHOLE=peephole is not None,
                          HAS_CLIP=options.cell_clip >= 0, HAS_KEEP_C=keep_c is not None)
        return (x.new_full((1,), options.cell_clip), blocks(B, U, whole_rows=layer_norm), blocks(B, N), flags,
                cell_flags)

    def float32_backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite, low):
        x, kernel, gate_gain, bias, R, peephole, cell_gain, cell_shift, P, h0, c0, reset_h, reset_c = inputs
        in_drop, rd, mask, keep_h, keep_c, reset = fixed
        z, h, c, a, rstd_h, x_normalized, rstd_x, m = saved[:SAVED_COUNT]  # (then the traces, if any)
        layer_norm = gate_gain is not None
        if not overwrite:
            z, a = z.clone(), None if a is None else a.clone()
        dy, dhT, dcT = output_grads
        (B, T, _), U, N = x.shape, c0.shape[1], h0.shape[1]
        G = 3 if options.coupled else 4
        steps = _steps()
        dh = x.new_zeros(B, N) if dhT is None else writable(dhT, x.dtype)
        dc = x.new_zeros(B, U) if dcT is None else writable(dcT, x.dtype)
        carry = x.new_zeros(B, N)
        d_peephole = None if peephole is None else x.new_zeros(G - 1, B, U)
        d_gain_h = x.new_zeros(B, G * U) if layer_norm else None
        d_cell_gain, d_cell_shift = (x.new_zeros(B, U), x.new_zeros(B, U)) if layer_norm else (None, None)
        d_reset_h, d_reset_c = (x.new_zeros(B, N), x.new_zeros(B, U)) if reset is not None else (None, None)
        dh_new = dm = None
        if P is not None:
            dh_new, dm = x.new_empty(T, B, N), x.new_empty(B, U)
        dy_steps, dy_stride_s, dy_stride_b = output_gradients(dy, options.return_sequences, z)
        clip, cell_blocks, output_blocks, flags, cell_flags = self._launch_settings(
            x, options, mask, keep_h, keep_c, peephole, layer_norm, U, N)
        given = or_placeholder(z)
        with on_device(x):
            for s in reversed(range(T)):
                t = T - 1 - s if options.go_backwards else s
                has_dy = dy is not None and (options.return_sequences or s == T - 1)
                if P is not None:
                    steps.lstm_output_backward_step[output_blocks[2]](
                        dh_new, dh, dy_steps, carry, given(mask), given(keep_h), s, t, B, N, T, dy_stride_s,
                        dy_stride_b, HAS_DY=has_dy, BLOCK_B=output_blocks[0], BLOCK_U=output_blocks[1], **flags)
                    torch.mm(dh_new[s], P.T, out=dm)
                steps.lstm_backward_step[cell_blocks[2]](
                    z, given(a), given(rstd_h), c, given(dm), dy_steps, dh, dc, carry, given(mask), given(keep_h),
                    given(keep_c), given(peephole), given(gate_gain), given(cell_gain), given(cell_shift), clip,
                    given(d_peephole), given(d_gain_h), given(d_cell_gain), given(d_cell_shift), s, t, B, U, T,
                    dy_stride_s, dy_stride_b, LAYER_NORM=layer_norm, PROJECTED=P is not None, HAS_DY=has_dy,
                    BLOCK_B=cell_blocks[0], BLOCK_U=cell_blocks[1], **flags, **cell_flags)
                add_recurrent_gradient(dh, a[s] if layer_norm else z[s], R, rd)
                restore_backward(dh, starts(reset, t), d_reset_h)
                restore_backward(dc, starts(reset, t), d_reset_c)
        dR = recurrent_weight_gradient(h[:T], (a if layer_norm else z).view(T * B, G * U), rd, low)
        dP = None if P is None else m.reshape(T * B, U).T @ dh_new.reshape(T * B, N)
        d_bias = z.sum((0, 1)) if bias is not None else None
        d_gate_gain = dxw = None
        if layer_norm:
            d_gate_gain = torch.stack([(z * x_normalized).sum((0, 1)), d_gain_h.sum(0)])
            dxw = _layer_norm_backward(z * gate_gain[0], x_normalized, rstd_x)
        dxk = (z if dxw is None else dxw).transpose(0, 1)  # [B, T, GU], processing order
        x_in_order = x.flip(1) if options.go_backwards else x
        dx, dkernel = input_projection_backward(x_in_order, kernel, in_drop, dxk, needs[0], needs[1],
                                                functools.partial(rounded, low=low))
        if dx is not None and options.go_backwards:
            dx = dx.flip(1)
        return (dx, dkernel, d_gate_gain, d_bias, dR, None if d_peephole is None else d_peephole.sum(1),
                None if d_cell_gain is None else d_cell_gain.sum(0),
                None if d_cell_shift is None else d_cell_shift.sum(0), dP, dh, dc, d_reset_h, d_reset_c)


SAVED_COUNT = 8
OP = TritonLSTMOp()


def _layer_norm(v: torch.Tensor) -> tuple:
    """((v - mean) / std over the last dimension, 1/std per row): reference.layer_norm's numbers."""
    centred = v - v.mean(-1, keepdim=True)
    rstd = torch.rsqrt((centred * centred).mean(-1) + LAYER_NORM_EPS)
    return centred * rstd[..., None], rstd


def _layer_norm_backward(d_normalized: torch.Tensor, normalized: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The gradient of v from that of `_layer_norm(v)`'s normalised value."""
    mean_d = d_normalized.mean(-1, keepdim=True)
    mean_dn = (d_normalized * normalized).mean(-1, keepdim=True)
    return rstd[..., None] * (d_normalized - mean_d - normalized * mean_dn)


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    return run_or_fall_back(name, _run, p)


def _run(p: Recurrence) -> RecurrenceResult:
    cell = p.cell
    B, T, _ = p.inputs.shape
    keep_h = keep_c = None
    if p.zoneout is not None:
        keep_h, keep_c = (p.zoneout.mask(stream, B, T, size, p.inputs.device)
                          for stream, size in enumerate((p.output_size, p.units)))
    options = Options(bool(p.go_backwards), bool(p.zero_output_for_mask), bool(p.return_sequences),
                      bool(cell.coupled), *support.activation_codes(cell),
                      -1.0 if cell.cell_clip is None else float(cell.cell_clip), bool(p.trace))
    mask = None if p.mask is None else p.mask.to(torch.bool).contiguous()
    reset = p.reset if p.reset is None or mask is None else p.reset & mask  # (ignored at steps that do not count)
    fixed = (p.input_dropout, p.recurrent_dropout, mask, keep_h, keep_c, reset)
    reset_states = tuple(p.reset_state) if p.reset is not None and p.reset_state is not None else (None, None)
    peephole = None if p.peephole is None else p.peephole.contiguous()
    gate_gain, cell_gain, cell_shift = (t.contiguous() for t in p.layer_norm) if p.layer_norm else (None,) * 3
    inputs = (p.inputs, p.kernel, gate_gain, bias_with_forget_bias(p), p.recurrent_kernel, peephole, cell_gain,
              cell_shift, p.projection, *p.initial_state, *reset_states)
    (y, hT, cT), saved = OP.call(inputs, fixed, options, keep_saved=p.trace)
    return RecurrenceResult(y, (hT, cT), _trace(p, saved) if p.trace else None)


def _trace(p: Recurrence, saved: list) -> dict:
    """The reference's trace, from the gates the forward saved and each step's own h and C, in
    processing order [B, T, *], detached."""
    z, trace_h, trace_c = saved[0], saved[SAVED_COUNT], saved[SAVED_COUNT + 1]
    gates = dict(zip(p.cell.gate_names, z.detach().transpose(0, 1).split(p.units, dim=-1)))
    f = gates["f"]
    return {"i": gates["i"] if "i" in gates else 1 - f, "f": f, "c_tilde": gates["c"],
            "c": trace_c.detach().transpose(0, 1), "o": gates["o"], "h": trace_h.detach().transpose(0, 1)}
