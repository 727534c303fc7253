"""The fused kernel for the LSTM variants (peephole, layer_norm, proj_size, coupled, forget_bias,
cell_clip, zoneout), in the same C++ extension as fused_cpp (csrc/lstm_variants.h).

The GEMMs over all steps run here, in torch: xk = x @ kernel (dropout masks first) before the
recurrence; after it dkernel = x^T dxk, dx = dxk kernel^T, dR = Hp^T dA and dP = Hu^T dr. Everything
per step runs in C++, forward and hand-derived backward: the bias (forget_bias included), the
input layer norm LN(xk) g_x (xk is saved with its rows' mean and 1/std, and normalised again in
the backward), the recurrence; it sums the gradients of the bias, the gains and the peepholes.

Recurrent DropConnect needs nothing here: the layer hands over the masked recurrent kernel.
It runs the plain LSTM too (so every test that runs each kernel checks it), but the dispatch
gives plain problems to fused_cpp, which is faster for them. Traces come from the forward's
buffers (the activated gates it saves anyway, copied when the backward will write its gradients
over them, plus each step's h and C), detached.

Autograd: eager calls use a torch.autograd.Function; under torch.compile / torch.export the same
functions run as the custom ops lstm::fused_variants_forward / lstm::fused_variants_backward (fake
kernels and autograd registered), so Dynamo traces a variant LSTM without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fused_cpp
from .problem import Recurrence, RecurrenceResult
from .reference import _per_gate

name = "fused_variants"

_SAVED = 11  # G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, xk, rstd_x, mean_x


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
        seed = 0 if zoneout is None else zoneout.seed  # (a tensor under torch.compile: rng.zoneout_seed)
        if isinstance(seed, torch.Tensor) and not torch.compiler.is_compiling():
            seed = int(seed)
        self.zoneout = (0, 0, 0, 0) if zoneout is None else (
            seed, zoneout.offset, zoneout.threshold(zoneout.rate_h), zoneout.threshold(zoneout.rate_c))
        self.trace = bool(p.trace)
        self.traced = None  # (G, H, C) of the forward, when a trace was asked for

    def flags(self) -> tuple:
        return self.backwards, self.zero_out, self.seq, self.coupled, self.act, self.ract, self.clip


def _detached(t):
    return None if t is None else t.detach()


def _project(x: torch.Tensor, kernel: torch.Tensor, in_drop, gates: int) -> torch.Tensor:
    """xk = x @ kernel [B, T, G*U], contiguous."""
    if in_drop is None:  # one 2-D GEMM, as matmul does with grad (a strided x would take another route)
        B, T, D = x.shape
        xk = fused_cpp.extension().pooled_empty([B * T, kernel.shape[1]], x)
        return torch.mm(x.reshape(B * T, D), kernel, out=xk).view(B, T, kernel.shape[1])
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


def _forward(x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0, in_drop, rd, mask, zoneout, flags,
             save: bool, trace: bool) -> list:
    """The C++ forward on detached tensors: Y, hT, cT, then with save the _SAVED buffers, then with
    trace each step's h and C."""
    xk = _project(x, kernel, in_drop, 3 if flags[3] else 4)
    return fused_cpp.extension().variant_forward(xk, gate_gain, bias, R, rd, peephole, gain_c, shift_c, P, *zoneout,
                                                 mask, h0, c0, *flags, save, trace)


def _backward(dY, dhT, dcT, saved, x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, in_drop, rd, mask,
              zoneout, flags, need_x: bool, need_kernel: bool, consume: bool) -> tuple:
    """The gradients of x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0 (None
    where the input is None, or for x and kernel where not needed); detached tensors. With consume
    the kernel may write gradients over saved buffers (G, or with layer norm xk and LN(A))."""
    placeholder = R.new_empty(0)
    saved_list = [placeholder if t is None else t for t in saved]
    grads = fused_cpp.extension().variant_backward(dY, dhT, dcT, saved_list, gate_gain, bias, R, rd, peephole, gain_c,
                                                   shift_c, P, *zoneout, mask, *flags, consume)
    dxk, dA, dr, dh0, dc0, d_peephole, d_gain_c, d_shift_c, d_gate_gain, d_bias = grads
    Hp, Hu = saved[1], saved[7]
    Ps, GU = R.shape
    U = GU // (3 if flags[3] else 4)
    dx, dkernel = _project_backward(x, kernel, in_drop, dxk, need_x, need_kernel)
    dA = dxk if dA is None else dA
    if rd is None:
        dR = Hp.reshape(-1, Ps).T @ dA.reshape(-1, GU)
    else:  # one keep-mask per gate on h_{t-1}
        dR = torch.cat([(Hp * rd[g][:, None, :]).reshape(-1, Ps).T @ dA[..., g * U:(g + 1) * U].reshape(-1, U)
                        for g in range(rd.shape[0])], dim=1)
    dP = None if P is None else Hu.reshape(-1, U).T @ dr.reshape(-1, Ps)
    return dx, dkernel, d_gate_gain, d_bias, dR, d_peephole, d_gain_c, d_shift_c, dP, dh0, dc0


class _VariantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, masks, x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0):
        weights = [_detached(t) for t in (x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0)]
        y, hT, cT, *saved = _forward(*weights, *masks, cfg.zoneout, cfg.flags(), True, cfg.trace)
        if cfg.trace:  # (the gates are copied: the backward writes its gradients over them)
            cfg.traced = (saved[0].clone(), *saved[_SAVED:])
            saved = saved[:_SAVED]
        ctx.cfg, ctx.masks, ctx.consumed = cfg, masks, False
        ctx.save_for_backward(*weights, *saved)
        return y, hT, cT

    @staticmethod
    def backward(ctx, dY, dhT, dcT):
        cfg = ctx.cfg
        weights, saved = ctx.saved_tensors[:11], ctx.saved_tensors[11:]
        if ctx.consumed:  # a second backward (retain_graph): the first wrote over saved buffers
            saved = _forward(*weights, *ctx.masks, cfg.zoneout, cfg.flags(), True, False)[3:]
        ctx.consumed = True
        grads = _backward(dY, dhT, dcT, saved, *weights[:9], *ctx.masks, cfg.zoneout, cfg.flags(),
                          *ctx.needs_input_grad[2:4], True)
        return (None, None) + grads


# ----- torch.compile: the same kernel as custom ops (forward, backward), as fused_cpp's ------------
# Eager calls go through the autograd.Function above (less dispatch cost); under torch.compile the
# ops below run instead, so Dynamo traces through without a graph break. The zoneout seed is a
# 0-dim int64 tensor there (drawn when the graph runs: layers.rng.zoneout_seed).
_ops = None
_DIFFERENTIABLE = 11  # x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0
_Outputs = tuple[(Tensor,) * (3 + _SAVED + 2)]  # Y, hT, cT, the saved buffers, the trace's h and C
_Grads = tuple[(Tensor,) * _DIFFERENTIABLE]


def _compile_ops():
    global _ops
    if _ops is not None:
        return _ops

    def zoneout_args(seed, offset, keep_h, keep_c):
        return int(seed), offset, keep_h, keep_c

    @torch.library.custom_op("lstm::fused_variants_forward", mutates_args=())
    def fwd(x: Tensor, kernel: Tensor, gate_gain: Optional[Tensor], bias: Optional[Tensor], R: Tensor,
            peephole: Optional[Tensor], gain_c: Optional[Tensor], shift_c: Optional[Tensor], P: Optional[Tensor],
            h0: Tensor, c0: Tensor, in_drop: Optional[Tensor],
            rd: Optional[Tensor], mask: Optional[Tensor], zoneout_seed: Tensor, zoneout_offset: int, keep_h: int,
            keep_c: int, backwards: bool, zero_out: bool, seq: bool, coupled: bool, act: int, ract: int,
            clip: float, save: bool, trace: bool) -> _Outputs:
        """Y, hT, cT, then (empty where unused) the saved buffers (with save) and the trace's h, C."""
        flags = (backwards, zero_out, seq, coupled, act, ract, clip)
        outs = _forward(x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0, in_drop, rd, mask,
                        zoneout_args(zoneout_seed, zoneout_offset, keep_h, keep_c), flags, save, trace)
        outs += [None] * (3 + _SAVED + 2 - len(outs))
        return tuple(x.new_empty(0) if t is None else t.contiguous() for t in outs)

    @fwd.register_fake
    def _(x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0, in_drop, rd, mask, zoneout_seed,
          zoneout_offset, keep_h, keep_c, backwards, zero_out, seq, coupled, act, ract, clip, save, trace):
        B, T, _ = x.shape
        Ps, GU = R.shape
        U = GU // (3 if coupled else 4)
        save = save or trace
        ln, proj = gate_gain is not None, P is not None

        def new(*shape, on=True):
            return x.new_empty(shape if on else (0,))

        saved = (new(B, T, GU), new(B, T, Ps), new(B, T, U), new(B, T, GU, on=ln), new(B, T, on=ln),
                 new(B, T, on=ln), new(B, T, on=ln), new(B, T, U, on=proj), new(B, T, GU, on=ln), new(B, T, on=ln),
                 new(B, T, on=ln))
        saved = tuple(t if save else new(0) for t in saved)
        y = new(B, T, Ps) if seq else new(B, Ps)
        return (y, new(B, Ps), new(B, U), *saved, new(B, T, Ps, on=trace), new(B, T, U, on=trace))

    @torch.library.custom_op("lstm::fused_variants_backward", mutates_args=())
    def bwd(dY: Optional[Tensor], dhT: Optional[Tensor], dcT: Optional[Tensor], saved: list[Tensor], x: Tensor,
            kernel: Tensor, gate_gain: Optional[Tensor], bias: Optional[Tensor], R: Tensor, peephole: Optional[Tensor],
            gain_c: Optional[Tensor], shift_c: Optional[Tensor], P: Optional[Tensor],
            in_drop: Optional[Tensor], rd: Optional[Tensor], mask: Optional[Tensor], zoneout_seed: Tensor,
            zoneout_offset: int, keep_h: int, keep_c: int, backwards: bool, zero_out: bool, seq: bool, coupled: bool,
            act: int, ract: int, clip: float, needs: list[bool]) -> _Grads:
        """The gradients of fwd's first 11 inputs, each empty where `needs` (same order) is False."""
        flags = (backwards, zero_out, seq, coupled, act, ract, clip)
        result = _backward(dY, dhT, dcT, saved, x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P,
                           in_drop, rd, mask, zoneout_args(zoneout_seed, zoneout_offset, keep_h, keep_c), flags,
                           needs[0], needs[1], False)
        return tuple(g.contiguous() if need else x.new_empty(0) for g, need in zip(result, needs))

    @bwd.register_fake
    def _(dY, dhT, dcT, saved, x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, in_drop, rd, mask,
          zoneout_seed, zoneout_offset, keep_h, keep_c, backwards, zero_out, seq, coupled, act, ract, clip, needs):
        inputs = (x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P)
        B, (Ps, GU) = x.shape[0], R.shape
        shapes = [(0,) if t is None else t.shape for t in inputs] + [(B, Ps), (B, GU // (3 if coupled else 4))]
        return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs[_DIFFERENTIABLE:]  # masks, zoneout, flags
        ctx.present = [t is not None for t in inputs[:_DIFFERENTIABLE]]
        ctx.save_for_backward(*inputs[:9], *output[3:3 + _SAVED])

    def backward(ctx, dY, dhT, dcT, *_):
        weights, saved = ctx.saved_tensors[:9], list(ctx.saved_tensors[9:])
        needs = [bool(n and present) for n, present in zip(ctx.needs_input_grad[:_DIFFERENTIABLE], ctx.present)]
        in_drop, rd, mask, *rest = ctx.inputs
        result = bwd(dY, dhT, dcT, saved, *weights, in_drop, rd, mask, *rest[:-2], needs)
        return tuple(g if need else None for g, need in zip(result, needs)) + (None,) * (len(ctx.inputs))

    fwd.register_autograd(backward, setup_context=setup_context)
    _ops = (fwd, bwd)
    return _ops


_compile_ops()  # Python definitions only (no C++ build): Dynamo cannot trace their creation


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
    fused_cpp.extension()  # loaded by supports() already, unless called directly
    cfg = _Cfg(p)
    gate_gain, gain_c, shift_c = p.layer_norm or (None, None, None)
    masks = (_detached(p.input_dropout), _detached(p.recurrent_dropout), p.mask)
    weights = (p.kernel, gate_gain, _bias(p), p.recurrent_kernel, p.peephole, gain_c, shift_c, p.projection, h0, c0)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
    if torch.compiler.is_compiling():  # torch.compile / torch.export: the custom ops
        seed, *zoneout = cfg.zoneout
        seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
        outs = _ops[0](x, *weights, *masks, seed, *zoneout, *cfg.flags(), grad, cfg.trace)
        trace = _trace(p, outs[3], *outs[3 + _SAVED:]) if cfg.trace else None
        return RecurrenceResult(outs[0], (outs[1], outs[2]), trace)
    if grad:
        y, hT, cT = _VariantFunction.apply(cfg, masks, x, *weights)
    else:
        detached = [_detached(t) for t in weights]
        y, hT, cT, *saved = _forward(x.detach(), *detached, *masks, cfg.zoneout, cfg.flags(), False, cfg.trace)
        if cfg.trace:
            cfg.traced = (saved[0], *saved[_SAVED:])
    return RecurrenceResult(y, (hT, cT), _trace(p, *cfg.traced) if cfg.trace else None)
