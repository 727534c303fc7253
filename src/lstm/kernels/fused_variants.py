"""The fused kernel for the LSTM variants (peephole, layer_norm, proj_size, coupled, forget_bias,
cell_clip, zoneout), in the same C++ extension as fused_cpp (csrc/lstm_variants.h).

The GEMMs over all steps run here, in torch: xk = x @ kernel (dropout masks first) before the
recurrence; after it dkernel = x^T dxk, dx = dxk kernel^T, dR = Hp^T dA and dP = Hu^T dr. Everything
per step runs in C++, forward and hand-derived backward: the bias (forget_bias included), the
input layer norm LN(xk) g_x (xk is normalised in place and saved as such: no buffer of its own),
the recurrence; it sums the gradients of the bias, the gains and the peepholes.

Recurrent DropConnect needs nothing here: the layer hands over the masked recurrent kernel.
It runs the plain LSTM too (so every test that runs each kernel checks it), but the dispatch
gives plain problems to fused_cpp, which is faster for them. Traces come from the forward's
buffers (the activated gates it saves anyway, plus each step's h and C), detached.
"""

from __future__ import annotations

import torch

from . import fused_cpp
from .problem import Recurrence, RecurrenceResult
from .reference import _per_gate

name = "fused_variants"

_SAVED = 11  # G, Hp, Cp, Cn, Ahat, rstd_h, Chat, rstd_c, Hu, Xhat, rstd_x


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


def _project(x: torch.Tensor, kernel: torch.Tensor, in_drop, gates: int) -> torch.Tensor:
    """xk = x @ kernel [B, T, G*U], a new buffer (the C++ forward normalises it in place)."""
    if in_drop is None:  # one 2-D GEMM, as matmul does with grad (a strided x would take another route)
        B, T, D = x.shape
        return (x.reshape(B * T, D) @ kernel).view(B, T, kernel.shape[1])
    return _per_gate(x, kernel, in_drop[:, :, None, :], gates).contiguous()


def _project_backward(x, kernel, in_drop, dxk, need_x: bool, need_kernel: bool):
    """(dx, dkernel) of `_project`, None where not needed: dropout keep-masks shared or per gate."""
    D, GU = kernel.shape
    if in_drop is None or in_drop.shape[0] == 1:
        xm = x if in_drop is None else x * in_drop[0][:, None, :]
        dkernel = xm.reshape(-1, D).T @ dxk.reshape(-1, GU) if need_kernel else None
        dx = None
        if need_x:
            dx = dxk @ kernel.T
            dx = dx if in_drop is None else dx * in_drop[0][:, None, :]
        return dx, dkernel
    U = GU // in_drop.shape[0]
    blocks = [(in_drop[g][:, None, :], slice(g * U, (g + 1) * U)) for g in range(in_drop.shape[0])]
    dkernel = torch.cat([(x * m).reshape(-1, D).T @ dxk[..., cols].reshape(-1, U) for m, cols in blocks],
                        dim=1) if need_kernel else None
    dx = sum((dxk[..., cols] @ kernel[:, cols].T) * m for m, cols in blocks) if need_x else None
    return dx, dkernel


class _VariantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, masks, x, kernel, gain_x, bias, R, peephole, gain_h, gain_c, shift_c, P, h0, c0):
        in_drop, rd, mask = masks
        xk = _project(x.detach(), kernel.detach(), in_drop, 3 if cfg.coupled else 4)
        weights = [_detached(t) for t in (peephole, gain_h, gain_c, shift_c, P)]
        y, hT, cT, *saved = fused_cpp._ext.variant_forward(
            xk, _detached(gain_x), _detached(bias), R.detach(), rd, *weights, *cfg.zoneout, mask, h0.detach(),
            c0.detach(), *cfg.flags(), True, cfg.trace)
        if cfg.trace:
            cfg.traced = (saved[0], *saved[_SAVED:])
            saved = saved[:_SAVED]
        ctx.cfg, ctx.masks = cfg, masks
        ctx.save_for_backward(x, kernel, gain_x, bias, R, peephole, gain_h, gain_c, shift_c, P, *saved)
        return y, hT, cT

    @staticmethod
    def backward(ctx, dY, dhT, dcT):
        cfg = ctx.cfg
        in_drop, rd, mask = ctx.masks
        x, kernel, gain_x, bias, R, peephole, gain_h, gain_c, shift_c, P, *saved = ctx.saved_tensors
        placeholder = R.new_empty(0)
        saved_list = [placeholder if t is None else t for t in saved]
        weights = [_detached(t) for t in (peephole, gain_h, gain_c, shift_c, P)]
        dxk, dA, dr, dh0, dc0, dpeep, dnorm_c, d_gain_h, d_gain_x, d_bias = fused_cpp._ext.variant_backward(
            dY, dhT, dcT, saved_list, _detached(gain_x), _detached(bias), R.detach(), rd, *weights, *cfg.zoneout,
            mask, *cfg.flags())
        Hp, Hu = saved[1], saved[8]
        Ps, GU = R.shape
        U = GU // (3 if cfg.coupled else 4)
        dx, dkernel = _project_backward(x.detach(), kernel.detach(), in_drop, dxk, *ctx.needs_input_grad[2:4])
        dA = dxk if dA is None else dA
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
        return (None, None, dx, dkernel, d_gain_x, d_bias, dR, d_peephole, d_gain_h, d_gain_c, d_shift_c, dP, dh0,
                dc0)


def _bias(p: Recurrence):
    """The bias the C++ step adds, forget_bias included (None when there is neither)."""
    cell = p.cell
    if not cell.forget_bias:
        return p.bias
    shift = torch.zeros(p.kernel.shape[1], dtype=p.inputs.dtype, device=p.inputs.device)
    f = cell.gate_names.index("f") * p.units
    shift[f:f + p.units] = cell.forget_bias
    return shift if p.bias is None else p.bias + shift


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
    gain_x = gain_h = gain_c = shift_c = None
    if p.layer_norm is not None:
        gate_gain, gain_c, shift_c = p.layer_norm
        gain_x, gain_h = gate_gain[0], gate_gain[1]
    masks = (_detached(p.input_dropout), _detached(p.recurrent_dropout), p.mask)
    weights = (p.kernel, gain_x, _bias(p), p.recurrent_kernel, p.peephole, gain_h, gain_c, shift_c, p.projection,
               h0, c0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights)):
        y, hT, cT = _VariantFunction.apply(cfg, masks, x, *weights)
    else:
        detached = [_detached(t) for t in weights]
        xk = _project(x.detach(), detached[0], masks[0], p.cell.gate_count)
        y, hT, cT, *saved = ext.variant_forward(xk, *detached[1:4], masks[1], *detached[4:9], *cfg.zoneout,
                                                masks[2], *detached[9:], *cfg.flags(), False, cfg.trace)
        if cfg.trace:
            cfg.traced = (saved[0], *saved[_SAVED:])
    return RecurrenceResult(y, (hT, cT), _trace(p, *cfg.traced) if cfg.trace else None)
