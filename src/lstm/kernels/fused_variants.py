"""The fused kernel for the LSTM variants (peephole, layer_norm, proj_size, coupled, forget_bias,
cell_clip, zoneout), in the same C++ extension as fused_cpp (csrc/lstm_variants.h).

What is not sequential runs here, in torch with autograd: xw = LN(x @ kernel) g_x + b for all
steps (the reference kernel's own `_input_projection`) plus forget_bias. The recurrence, forward
and hand-derived backward, runs in C++; the weight gradients are then one GEMM each over all steps:
dR = Hp^T dA, dP = Hu^T dr, and the sums for g_h, peepholes and the cell norm.

Recurrent DropConnect needs nothing here: the layer hands over the masked recurrent kernel.
It runs the plain LSTM too (so every test that runs each kernel checks it), but the dispatch
gives plain problems to fused_cpp, which is faster for them; traces go to the reference kernel.
"""

from __future__ import annotations

import torch

from . import fused_cpp
from .problem import Recurrence, RecurrenceResult
from .reference import _input_projection

name = "fused_variants"

_SAVED = 9  # G, Hp, Cp, Cn, Ahat, rstd_h, Chat, rstd_c, Hu


def supports(p: Recurrence) -> bool:
    cell = p.cell
    if p.trace or cell.kind != "lstm":
        return False
    if fused_cpp._code(cell.activation) is None or fused_cpp._code(cell.recurrent_activation) is None:
        return False
    dtype = p.inputs.dtype
    if dtype not in (torch.float32, torch.float64) or p.inputs.dim() != 3:
        return False
    zoneout = p.zoneout or ()
    norm = p.layer_norm or ()
    tensors = (p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout, p.peephole,
               p.projection, *norm, *zoneout, *p.initial_state)
    if any(t is not None and (not t.is_cpu or t.dtype != dtype) for t in tensors):
        return False
    if p.mask is not None and not p.mask.is_cpu:
        return False
    return fused_cpp.extension() is not None


class _Cfg:
    __slots__ = ("backwards", "zero_out", "seq", "coupled", "act", "ract", "clip")

    def __init__(self, p: Recurrence):
        cell = p.cell
        self.backwards = bool(p.go_backwards)
        self.zero_out = bool(p.zero_output_for_mask)
        self.seq = bool(p.return_sequences)
        self.coupled = bool(cell.coupled)
        self.act = fused_cpp._code(cell.activation)
        self.ract = fused_cpp._code(cell.recurrent_activation)
        self.clip = -1.0 if cell.cell_clip is None else float(cell.cell_clip)

    def flags(self) -> tuple:
        return self.backwards, self.zero_out, self.seq, self.coupled, self.act, self.ract, self.clip


def _detached(t):
    return None if t is None else t.detach()


class _VariantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, masks, xw, R, peephole, gain_h, gain_c, shift_c, P, h0, c0):
        rd, keep_h, keep_c, mask = masks
        weights = [_detached(t) for t in (peephole, gain_h, gain_c, shift_c, P)]
        y, hT, cT, *saved = fused_cpp._ext.variant_forward(
            xw.detach(), R.detach(), rd, *weights, keep_h, keep_c, mask, h0.detach(), c0.detach(), *cfg.flags(), True)
        ctx.cfg, ctx.masks = cfg, masks
        ctx.save_for_backward(R, peephole, gain_h, gain_c, shift_c, P, *saved)
        return y, hT, cT

    @staticmethod
    def backward(ctx, dY, dhT, dcT):
        cfg = ctx.cfg
        rd, keep_h, keep_c, mask = ctx.masks
        R, peephole, gain_h, gain_c, shift_c, P, *saved = ctx.saved_tensors
        placeholder = R.new_empty(0)
        saved_list = [placeholder if t is None else t for t in saved]
        weights = [_detached(t) for t in (peephole, gain_h, gain_c, shift_c, P)]
        dxw, dA, dr, dh0, dc0, dpeep, dnorm_c = fused_cpp._ext.variant_backward(
            dY, dhT, dcT, saved_list, R.detach(), rd, *weights, keep_h, keep_c, mask, *cfg.flags())
        G, Hp, _, _, Ahat, _, _, _, Hu = saved
        Ps, GU = R.shape
        U = GU // (3 if cfg.coupled else 4)
        dA = dxw if dA is None else dA
        if rd is None:
            dR = Hp.reshape(-1, Ps).T @ dA.reshape(-1, GU)
        else:  # one keep-mask per gate on h_{t-1}
            dR = torch.cat([(Hp * rd[g][:, None, :]).reshape(-1, Ps).T @ dA[..., g * U:(g + 1) * U].reshape(-1, U)
                            for g in range(rd.shape[0])], dim=1)
        d_peephole = d_gain_h = d_gain_c = d_shift_c = dP = None
        if peephole is not None:
            d_peephole = dpeep[1:] if cfg.coupled else dpeep
        if gain_h is not None:
            d_gain_h = (dxw * Ahat).sum((0, 1))
            d_gain_c, d_shift_c = dnorm_c[0], dnorm_c[1]
        if P is not None:
            dP = Hu.reshape(-1, U).T @ dr.reshape(-1, Ps)
        return None, None, dxw, dR, d_peephole, d_gain_h, d_gain_c, d_shift_c, dP, dh0, dc0


def _forget_bias(p: Recurrence, xw: torch.Tensor) -> torch.Tensor:
    cell = p.cell
    if not cell.forget_bias:
        return xw
    shift = torch.zeros(xw.shape[-1], dtype=xw.dtype)
    f = cell.gate_names.index("f") * p.units
    shift[f:f + p.units] = cell.forget_bias
    return xw + shift


def run(p: Recurrence) -> RecurrenceResult:
    x = p.inputs
    h0, c0 = p.initial_state
    if x.shape[1] == 0:
        B, P = x.shape[0], p.output_size
        out = x.new_zeros(B, 0, P) if p.return_sequences else x.new_zeros(B, P)
        return RecurrenceResult(out, (h0, c0))
    ext = fused_cpp.extension()  # loaded by supports() already, unless called directly
    cfg = _Cfg(p)
    xw = _forget_bias(p, _input_projection(p, x))
    gain_h = gain_c = shift_c = None
    if p.layer_norm is not None:  # the input half of the gate gain is in xw already
        gate_gain, gain_c, shift_c = p.layer_norm
        gain_h = gate_gain[1]
    keep_h, keep_c = p.zoneout or (None, None)
    masks = (_detached(p.recurrent_dropout), _detached(keep_h), _detached(keep_c), p.mask)
    weights = (p.recurrent_kernel, p.peephole, gain_h, gain_c, shift_c, p.projection, h0, c0)
    if torch.is_grad_enabled() and (xw.requires_grad or any(t is not None and t.requires_grad for t in weights)):
        y, hT, cT = _VariantFunction.apply(cfg, masks, xw, *weights)
    else:
        detached = [_detached(t) for t in weights]
        y, hT, cT = ext.variant_forward(xw.detach(), detached[0], masks[0], *detached[1:6], *masks[1:],
                                        *detached[6:], *cfg.flags(), False)
    return RecurrenceResult(y, (hT, cT))
