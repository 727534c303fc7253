"""The fused kernel for the LSTM variants (peephole, layer_norm, proj_size, coupled, forget_bias,
cell_clip, zoneout), in the same C++ extension as fused_cpp (csrc/lstm_variants.h).

What is not sequential runs here, in torch with autograd: xw = LN(x @ kernel) g_x + b (+
forget_bias) for all steps, one addmm or layer_norm op. The recurrence, forward
and hand-derived backward, runs in C++; the weight gradients are then one GEMM each over all steps:
dR = Hp^T dA and dP = Hu^T dr (the C++ loop sums the other weights' gradients).

Recurrent DropConnect needs nothing here: the layer hands over the masked recurrent kernel.
It runs the plain LSTM too (so every test that runs each kernel checks it), but the dispatch
gives plain problems to fused_cpp, which is faster for them. Traces come from the forward's
buffers (the activated gates it saves anyway, plus each step's h and C), detached.
"""

from __future__ import annotations

import torch

from . import fused_cpp
from .problem import Recurrence, RecurrenceResult
from .reference import LAYER_NORM_EPS, _per_gate

name = "fused_variants"

_SAVED = 9  # G, Hp, Cp, Cn, Ahat, rstd_h, Chat, rstd_c, Hu


def supports(p: Recurrence) -> bool:
    cell = p.cell
    if cell.kind != "lstm":
        return False
    if fused_cpp._code(cell.activation) is None or fused_cpp._code(cell.recurrent_activation) is None:
        return False
    dtype = p.inputs.dtype
    if dtype not in (torch.float32, torch.float64) or p.inputs.dim() != 3:
        return False
    norm = p.layer_norm or ()
    tensors = (p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout, p.peephole,
               p.projection, *norm, *p.initial_state)
    if any(t is not None and (not t.is_cpu or t.dtype != dtype) for t in tensors):
        return False
    if p.mask is not None and not p.mask.is_cpu:
        return False
    return fused_cpp.extension() is not None


class _Cfg:
    __slots__ = ("backwards", "zero_out", "seq", "coupled", "act", "ract", "clip", "zoneout", "trace", "traced")

    def __init__(self, p: Recurrence):
        cell = p.cell
        self.backwards = bool(p.go_backwards)
        self.zero_out = bool(p.zero_output_for_mask)
        self.seq = bool(p.return_sequences)
        self.coupled = bool(cell.coupled)
        self.act = fused_cpp._code(cell.activation)
        self.ract = fused_cpp._code(cell.recurrent_activation)
        self.clip = -1.0 if cell.cell_clip is None else float(cell.cell_clip)
        zoneout = p.zoneout
        self.zoneout = (0, 0, 0) if zoneout is None else (
            zoneout.seed, zoneout.threshold(zoneout.rate_h), zoneout.threshold(zoneout.rate_c))
        self.trace = bool(p.trace)
        self.traced = None  # (G, H, C) of the forward, when a trace was asked for

    def flags(self) -> tuple:
        return self.backwards, self.zero_out, self.seq, self.coupled, self.act, self.ract, self.clip


def _detached(t):
    return None if t is None else t.detach()


class _VariantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, masks, xw, R, peephole, gain_h, gain_c, shift_c, P, h0, c0):
        rd, mask = masks
        weights = [_detached(t) for t in (peephole, gain_h, gain_c, shift_c, P)]
        y, hT, cT, *saved = fused_cpp._ext.variant_forward(
            xw.detach(), R.detach(), rd, *weights, *cfg.zoneout, mask, h0.detach(), c0.detach(), *cfg.flags(), True,
            cfg.trace)
        if cfg.trace:
            cfg.traced = (saved[0], *saved[_SAVED:])
            saved = saved[:_SAVED]
        ctx.cfg, ctx.masks = cfg, masks
        ctx.save_for_backward(R, peephole, gain_h, gain_c, shift_c, P, *saved)
        return y, hT, cT

    @staticmethod
    def backward(ctx, dY, dhT, dcT):
        cfg = ctx.cfg
        rd, mask = ctx.masks
        R, peephole, gain_h, gain_c, shift_c, P, *saved = ctx.saved_tensors
        placeholder = R.new_empty(0)
        saved_list = [placeholder if t is None else t for t in saved]
        weights = [_detached(t) for t in (peephole, gain_h, gain_c, shift_c, P)]
        dxw, dA, dr, dh0, dc0, dpeep, dnorm_c, d_gain_h = fused_cpp._ext.variant_backward(
            dY, dhT, dcT, saved_list, R.detach(), rd, *weights, *cfg.zoneout, mask, *cfg.flags())
        Hp, Hu = saved[1], saved[8]
        Ps, GU = R.shape
        U = GU // (3 if cfg.coupled else 4)
        dA = dxw if dA is None else dA
        if rd is None:
            dR = Hp.reshape(-1, Ps).T @ dA.reshape(-1, GU)
        else:  # one keep-mask per gate on h_{t-1}
            dR = torch.cat([(Hp * rd[g][:, None, :]).reshape(-1, Ps).T @ dA[..., g * U:(g + 1) * U].reshape(-1, U)
                            for g in range(rd.shape[0])], dim=1)
        d_peephole = d_gain_c = d_shift_c = dP = None
        if peephole is not None:
            d_peephole = dpeep[1:] if cfg.coupled else dpeep
        if gain_h is not None:
            d_gain_c, d_shift_c = dnorm_c[0], dnorm_c[1]
        if P is not None:
            dP = Hu.reshape(-1, U).T @ dr.reshape(-1, Ps)
        return None, None, dxw, dR, d_peephole, d_gain_h, d_gain_c, d_shift_c, dP, dh0, dc0


def _input_projection(p: Recurrence, x: torch.Tensor) -> torch.Tensor:
    """xw for every step, as reference's input projection (plus forget_bias in the bias), in one
    fused torch op where it can: addmm, or layer_norm with its gain and the bias."""
    cell = p.cell
    B, T, D = x.shape
    GU = p.kernel.shape[1]
    bias = p.bias
    if cell.forget_bias:
        shift = torch.zeros(GU, dtype=x.dtype, device=x.device)
        f = cell.gate_names.index("f") * p.units
        shift[f:f + p.units] = cell.forget_bias
        bias = shift if bias is None else bias + shift
    masks = None if p.input_dropout is None else p.input_dropout[:, :, None, :]
    if cell.layer_norm:
        xk = _per_gate(x, p.kernel, masks, cell.gate_count)
        return torch.nn.functional.layer_norm(xk, (GU,), p.layer_norm[0][0], bias, LAYER_NORM_EPS)
    if masks is None and bias is not None:
        return torch.addmm(bias, x.reshape(B * T, D), p.kernel).view(B, T, GU)
    xw = _per_gate(x, p.kernel, masks, cell.gate_count)
    return xw if bias is None else xw + bias


def _trace(p: Recurrence, G: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> dict:
    """The reference's trace from the forward's buffers (G is in time order), detached."""
    gates = dict(zip(p.cell.gate_names, G.split(p.units, dim=-1)))
    if p.go_backwards:
        gates = {name: gate.flip(1) for name, gate in gates.items()}
    f = gates["f"]
    return {"i": gates["i"] if "i" in gates else 1 - f, "f": f, "c_tilde": gates["c"], "c": C, "o": gates["o"], "h": H}


def run(p: Recurrence) -> RecurrenceResult:
    x = p.inputs
    h0, c0 = p.initial_state
    if x.shape[1] == 0:
        B, P, U = x.shape[0], p.output_size, p.units
        out = x.new_zeros(B, 0, P) if p.return_sequences else x.new_zeros(B, P)
        trace = {k: x.new_zeros(B, 0, P if k == "h" else U) for k in ("i", "f", "c_tilde", "c", "o", "h")}
        return RecurrenceResult(out, (h0, c0), trace if p.trace else None)
    ext = fused_cpp.extension()  # loaded by supports() already, unless called directly
    cfg = _Cfg(p)
    xw = _input_projection(p, x)
    gain_h = gain_c = shift_c = None
    if p.layer_norm is not None:  # the input half of the gate gain is in xw already
        gate_gain, gain_c, shift_c = p.layer_norm
        gain_h = gate_gain[1]
    masks = (_detached(p.recurrent_dropout), p.mask)
    weights = (p.recurrent_kernel, p.peephole, gain_h, gain_c, shift_c, p.projection, h0, c0)
    if torch.is_grad_enabled() and (xw.requires_grad or any(t is not None and t.requires_grad for t in weights)):
        y, hT, cT = _VariantFunction.apply(cfg, masks, xw, *weights)
    else:
        detached = [_detached(t) for t in weights]
        y, hT, cT, *saved = ext.variant_forward(xw.detach(), detached[0], masks[0], *detached[1:6], *cfg.zoneout,
                                                masks[1], *detached[6:], *cfg.flags(), False, cfg.trace)
        if cfg.trace:
            cfg.traced = (saved[0], *saved[_SAVED:])
    return RecurrenceResult(y, (hT, cT), _trace(p, *cfg.traced) if cfg.trace else None)
