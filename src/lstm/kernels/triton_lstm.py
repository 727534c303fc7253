"""The LSTM on the GPU where cuDNN cannot run it (torch_rnn.py runs what it can): every mask,
recurrent dropout, zoneout and the variants peephole, coupled (CIFG), forget_bias and cell_clip,
with Keras' activations, in float32, float64, bfloat16 and float16.

Per call: one GEMM projects every step's input (x @ kernel + bias, dropout masks first). Then per
step, in processing order: torch's GEMM adds h_{s-1} @ recurrent_kernel (the recurrent dropout
masks first) to that step's pre-activations, and one Triton program (triton_steps.py) does the
rest of the step: the gates, C, h, the mask, zoneout, the output. The backward is hand-derived, in
the same shape: per reverse step a Triton program turns the saved gates into their
pre-activations' gradients and a GEMM carries them to h_{s-1}; after the loop three GEMMs give the
gradients of the kernels and the inputs (haste's structure, without atomics: deterministic).

bfloat16/float16 follow the rules of problem.py's Recurrence ("Precision"): the recurrence in
float32 on operands rounded to the compute dtype, h rounded at every step
(`fused.RoundedOperandsOp`). Autograd, torch.compile and torch.export: `fused.FusedOp` (the custom
ops are lstm::triton_lstm_forward / lstm::triton_lstm_backward).

It runs on CUDA tensors. Under Triton's interpreter (TRITON_INTERPRET=1) it also runs CPU tensors
when forced (`lstm.kernels.use("triton_lstm")`): how the tests check it without a GPU. Not here
yet (the reference kernel runs them on the GPU): layer_norm, proj_size, traces, resets.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import NamedTuple

import torch

from . import fused, support
from .dispatch import forced_name
from .input_projection import bias_with_forget_bias, input_projection_backward
from .problem import LOW_PRECISION, Recurrence, RecurrenceResult, answers_empty_sequences
from .reference import masked_product

name = "triton_lstm"

ROUND_H = {torch.bfloat16: 1, torch.float16: 2}  # triton_steps._rounded's codes


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(p: Recurrence) -> bool:
    cell = p.cell
    if cell.kind != "lstm" or cell.layer_norm or cell.proj_size or p.trace:
        return False
    if support.activation_codes(cell) is None or not _triton_installed():
        return False
    device = p.inputs.device
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting() and forced_name() == name):
        return False
    return support.on_one_device_in_compute_dtypes(p)


class Options(NamedTuple):
    """The options of a call (cell_clip -1: none)."""

    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    coupled: bool
    activation: int
    recurrent_activation: int
    cell_clip: float


def _steps():
    """The Triton programs (importing triton once, on first use)."""
    from . import triton_steps
    return triton_steps


def _on_device(x: torch.Tensor):
    """The launches' current device: the tensors'."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rounded(t: torch.Tensor, low) -> torch.Tensor:
    return t if low is None else t.to(low).float()


def _recurrent_operands(h: torch.Tensor, recurrent_dropout, low) -> torch.Tensor:
    """h [B, U] as the recurrent products' operands: [G, B, U] after each gate's dropout mask."""
    return _rounded(h[None] * recurrent_dropout, low)


class TritonLSTMOp(fused.RoundedOperandsOp):
    """forward -> Y, hT, cT, then (with save) the buffers of triton_steps.py: z (the activated
    gates), h and c of every step."""

    name = "triton_lstm"
    input_names = ("x", "kernel", "bias", "recurrent_kernel", "peephole", "h0", "c0")
    fixed_names = ("input_dropout", "recurrent_dropout", "mask", "keep_h", "keep_c")
    output_count = 3
    Options = Options
    overwrites_saved = True  # z: the gates, then their gradients
    needs_extension = False

    def float32_forward(self, inputs, fixed, options, save, low):
        x, kernel, bias, R, peephole, h0, c0 = inputs
        in_drop, rd, mask, keep_h, keep_c = fixed
        B, T, _ = x.shape
        U, G = c0.shape[1], 3 if options.coupled else 4
        steps = _steps()
        x_in_order = x.flip(1) if options.go_backwards else x
        z = _project(x_in_order.transpose(0, 1), kernel, in_drop, G, low)  # [T, B, GU]
        if bias is not None:
            z += bias
        h = x.new_empty(T + 1, B, U)
        c = x.new_empty(T + 1, B, U)
        h[0], c[0] = h0, c0
        y = x.new_empty(T, B, U)
        clip = x.new_full((1,), options.cell_clip)
        block_b, block_u, grid = steps.blocks(B, U)
        flags = self._flags(options, mask, keep_h, keep_c, peephole)
        recurrent_blocks = None if rd is None else R.view(U, G, U).transpose(0, 1)  # [G, U, U]
        with _on_device(x):
            for s in range(T):
                if rd is None:
                    z[s].addmm_(h[s], R)
                else:
                    z[s] += torch.bmm(_recurrent_operands(h[s], rd, low), recurrent_blocks).transpose(0, 1).reshape(B, G * U)
                t = T - 1 - s if options.go_backwards else s
                steps.lstm_forward_step[grid](
                    z, h, c, y, mask if mask is not None else z, keep_h if keep_h is not None else z,
                    keep_c if keep_c is not None else z, peephole if peephole is not None else z,
                    s, t, B, U, T, clip, ROUND_H=ROUND_H.get(low, 0), BLOCK_B=block_b, BLOCK_U=block_u, **flags)
        outputs = y.transpose(0, 1).contiguous() if options.return_sequences else y[T - 1]
        saved = (z, h, c) if save else (None, None, None)
        return [outputs, h[T].clone(), c[T].clone(), *saved]

    def forward_shapes(self, inputs, fixed, options, save):
        x, c0 = inputs[0], inputs[6]
        (B, T, _), U = x.shape, c0.shape[1]
        G = 3 if options.coupled else 4
        saved = [(T, B, G * U), (T + 1, B, U), (T + 1, B, U)] if save else [(0,)] * 3
        return [(B, T, U) if options.return_sequences else (B, U), (B, U), (B, U), *saved]

    @staticmethod
    def _flags(options, mask, keep_h, keep_c, peephole) -> dict:
        return dict(COUPLED=options.coupled, ACTIVATION=options.activation,
                    RECURRENT_ACTIVATION=options.recurrent_activation, HAS_MASK=mask is not None,
                    HAS_KEEP_H=keep_h is not None, HAS_KEEP_C=keep_c is not None, HAS_PEEPHOLE=peephole is not None,
                    HAS_CLIP=options.cell_clip >= 0, ZERO_OUTPUT=options.zero_output_for_mask)

    def float32_backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite, low):
        x, kernel, bias, R, peephole, h0, c0 = inputs
        in_drop, rd, mask, keep_h, keep_c = fixed
        z, h, c = saved
        if not overwrite:
            z = z.clone()
        dy, dhT, dcT = output_grads
        B, T, _ = x.shape
        U, G = c0.shape[1], 3 if options.coupled else 4
        steps = _steps()
        dh = x.new_zeros(B, U) if dhT is None else _writable(dhT, x.dtype)
        dc = x.new_zeros(B, U) if dcT is None else _writable(dcT, x.dtype)
        carry = x.new_zeros(B, U)
        dpeephole = None if peephole is None else x.new_zeros(G - 1, B, U)
        dy = None if dy is None else dy.contiguous()  # (an expanded gradient has stride 0)
        if dy is not None and options.return_sequences:
            dy_steps = dy.transpose(0, 1)  # [T, B, U], processing order
            dy_stride_s, dy_stride_b = dy_steps.stride(0), dy_steps.stride(1)
        elif dy is not None:
            dy_steps, dy_stride_s, dy_stride_b = dy, 0, dy.stride(0)  # the last step's only
        else:
            dy_steps, dy_stride_s, dy_stride_b = z, 0, 0
        clip = x.new_full((1,), options.cell_clip)
        block_b, block_u, grid = steps.blocks(B, U)
        flags = self._flags(options, mask, keep_h, keep_c, peephole)
        recurrent_blocks = None if rd is None else R.view(U, G, U).transpose(0, 1)  # [G, U, U]
        with _on_device(x):
            for s in reversed(range(T)):
                t = T - 1 - s if options.go_backwards else s
                has_dy = dy is not None and (options.return_sequences or s == T - 1)
                steps.lstm_backward_step[grid](
                    z, c, dy_steps, dh, dc, carry, mask if mask is not None else z,
                    keep_h if keep_h is not None else z, keep_c if keep_c is not None else z,
                    peephole if peephole is not None else z, dpeephole if dpeephole is not None else z,
                    s, t, B, U, T, clip, dy_stride_s, dy_stride_b, HAS_DY=has_dy, BLOCK_B=block_b,
                    BLOCK_U=block_u, **flags)
                if rd is None:
                    dh.addmm_(z[s], R.T)
                else:  # sum over the gates of (dz_g @ U_g^T) * mask_g
                    dz_blocks = z[s].view(B, G, U).transpose(0, 1)
                    dh.add_((torch.bmm(dz_blocks, recurrent_blocks.transpose(1, 2)) * rd).sum(0))
        dz = z.view(T * B, G * U)
        if rd is None:
            dR = h[:T].reshape(T * B, U).T @ dz
        else:
            dR = torch.cat([_rounded(h[:T] * rd[g], low).reshape(T * B, U).T @ dz[:, g * U:(g + 1) * U]
                            for g in range(G)], dim=1)
        d_bias = dz.sum(0) if bias is not None else None
        dxk = z.transpose(0, 1)  # [B, T, GU], processing order
        x_in_order = x.flip(1) if options.go_backwards else x
        dx, dkernel = input_projection_backward(x_in_order, kernel, in_drop, dxk, needs[0], needs[1],
                                                functools.partial(_rounded, low=low))
        if dx is not None and options.go_backwards:
            dx = dx.flip(1)
        d_peephole = None if dpeephole is None else dpeephole.sum(1)
        return dx, dkernel, d_bias, dR, d_peephole, dh, dc


OP = TritonLSTMOp()


def _project(x: torch.Tensor, kernel: torch.Tensor, in_drop, gates: int, low) -> torch.Tensor:
    """x [T, B, D] @ kernel: [T, B, G*U], contiguous, the input dropout masks ([1 or G, B, D])
    first; in bfloat16/float16 (`low`) the dropped-out x rounded to it, as the reference kernel
    rounds a product's operand."""
    masks = None if in_drop is None else in_drop[:, None]
    return masked_product(x, kernel, masks, gates, functools.partial(_rounded, low=low)).contiguous()


def _writable(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of t in dtype (a gradient may be expanded, with stride 0)."""
    return t.to(dtype, memory_format=torch.contiguous_format, copy=True)


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    cell = p.cell
    B, T, _ = p.inputs.shape
    keep_h = keep_c = None
    if p.zoneout is not None:
        keep_h, keep_c = (p.zoneout.mask(stream, B, T, p.units, p.inputs.device) for stream in (0, 1))
    options = Options(bool(p.go_backwards), bool(p.zero_output_for_mask), bool(p.return_sequences),
                      bool(cell.coupled), *support.activation_codes(cell),
                      -1.0 if cell.cell_clip is None else float(cell.cell_clip))
    mask = None if p.mask is None else p.mask.to(torch.bool).contiguous()
    fixed = (p.input_dropout, p.recurrent_dropout, mask, keep_h, keep_c)
    peephole = None if p.peephole is None else p.peephole.contiguous()
    inputs = (p.inputs, p.kernel, bias_with_forget_bias(p), p.recurrent_kernel, peephole, *p.initial_state)
    (y, hT, cT), _ = OP.call(inputs, fixed, options)
    return RecurrenceResult(y, (hT, cT))
