"""The C++ fused LSTM kernel: one kernel core (csrc/lstm_cpu.cpp), thin bindings here.

    training  xw = x @ kernel + b            one GEMM over [B*T, D] (dropout masks first)
              per step: z = xw_t + h @ R (MKL sgemm_/dgemm_, or a register loop for batch <= 4),
              gates, state and output fused in one vectorised pass (in place in xw: the saved gates)
    backward  per step (reverse): dZ_t from the saved gates, dh_{t-1} = dZ_t @ R^T;
              then dR = H_prev^T @ dZ, dkernel = x^T @ dZ, dx = dZ @ kernel^T, db = ΣdZ
    inference batch > 4: no [B,T,4U] buffer; per step one GEMM [x_t, h] @ [kernel; R]
              batch <= 4: as training, without saving; T == 1 (cell calls): one fused step
    cell call `cell(x_t, [h, c])`: `CellCall`, one C++ call (`cell_step`) that makes the layer's
              checks and runs that fused step (with autograd: the autograd Function directly),
              skipping the `Recurrence` and the dispatch
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

Traces (`trace=True`): the training forward's saved buffers are the trace: the gates i, f, c̃, o
are views of the activated gates, c and h the states after each step (at a masked step the
step's own values, as the reference gives them, computed from the saved gates and state).
A call with a trace therefore runs the saving forward even without grad; a call without one
is unchanged. The traces are detached (no gradient flows back through them; the outputs and
states stay differentiable): for gradients through gate values use the reference kernel
(`lstm.kernels.use("reference")`).

Autograd: eager calls use a torch.autograd.Function (the custom-op dispatch costs ~40 us a call
against ~16 us, measured at batch 1, T = 1); under torch.compile the same C++ functions run as
the custom ops lstm::fused_cpp_forward / lstm::fused_cpp_backward (fake kernels and autograd
registered; lstm::fused_cpp_inference when nothing needs grad), so Dynamo traces through without a
graph break, and torch.export puts them in the exported graph.

The extension is compiled with torch.utils.cpp_extension.load (ninja, -O3 -march=native) on
first use only and cached in torch's extensions directory under a name hashed from the source
and flags (~35 s the first time ever, ~0.3 s to load after). If building or loading fails, a
warning is given once and `supports` answers False, so the dispatch falls back to the Numba
kernel. LSTM_NO_CPP=1 disables it.
"""

from __future__ import annotations

from typing import Optional

import torch

from torch import Tensor

from . import dispatch, native
from .problem import Recurrence, RecurrenceResult

name = "fused_cpp"

_DTYPES = (torch.float32, torch.float64)
_code = native.activation_code
extension = native.extension
unavailable_reason = native.unavailable_reason


def supports(p: Recurrence) -> bool:
    cell = p.cell
    if not p.plain or cell.kind != "lstm" or _code(cell.activation) is None or _code(cell.recurrent_activation) is None:
        return False
    x = p.inputs
    dtype = x.dtype
    if (dtype is not torch.float32 and dtype is not torch.float64) or x.dim() != 3 or len(p.initial_state) != 2:
        return False
    for t in (x, p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout, *p.initial_state):
        if t is not None and (not t.is_cpu or t.dtype is not dtype):
            return False
    if p.mask is not None and not p.mask.is_cpu:
        return False
    if p.bias is not None and p.bias.dim() != 1:
        return False
    if torch.compiler.is_compiling():
        return native.loaded_when_tracing()
    return (native.module or extension()) is not None


class CellCall:
    """The Keras cell call `out, [h, c] = cell(x_t, [h, c])` of a plain LSTM cell as one C++ call
    (`cell_step`), skipping the `Recurrence` and the dispatch. What does not change between calls
    (the activation codes, whether the cell draws random masks in training) is kept here; the
    cell drops it when an attribute or a weight is set. Every per-call check of the full route is
    made in C++ on the tensors as they are. Without autograd the C++ call is the step (the one the
    full route runs for T == 1); with it, the autograd Function runs directly, as the full route
    runs it. A call it does not take (a conversion or an error to report, a forced kernel,
    torch.compile, masks drawn in training) returns None, and the cell takes the full route, which
    computes the same numbers or raises its error."""

    __slots__ = ("act", "ract", "draws", "cfg")

    def __init__(self, cell):
        self.act = _code(cell.activation)
        self.ract = _code(cell.recurrent_activation)
        # dropout masks, and the LSTM cell's training-only zoneout and DropConnect
        self.draws = bool(cell.dropout or cell.recurrent_dropout or getattr(cell, "recurrent_dropconnect", 0)
                          or any(getattr(cell, "zoneout", ())))
        self.cfg = _Cfg.one_step(self.act, self.ract)

    def __call__(self, cell, x, states, training):
        if (self.draws and (cell.training if training is None else training)) or dispatch._forced_name():
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
        out = native.module.cell_step(x, h, c, kernel, recurrent_kernel, bias, self.act, self.ract)
        if len(out) == 3:
            return out[0], out[1:]
        if not out:
            return None
        if h is None:  # (the full route's zero states)
            h, c = x.new_zeros(x.shape[0], cell.units), x.new_zeros(x.shape[0], cell.units)
        y, h, c = _LSTMFunction.apply(self.cfg, x[:, None, :], kernel, recurrent_kernel, bias, h, c, None, None, None)
        return y, [h, c]


def cell_call(cell):
    """The lean route of `cell`'s calls (a CellCall), or False where it never applies."""
    if (cell.kind != "lstm" or not cell.built or not cell.cell_spec().plain or _code(cell.activation) is None
            or _code(cell.recurrent_activation) is None or extension() is None):
        return False
    return CellCall(cell)


class _Cfg:
    __slots__ = ("backwards", "zero_out", "seq", "act", "ract", "saved")

    def __init__(self, backwards: bool, zero_out: bool, seq: bool, act: int, ract: int):
        self.backwards, self.zero_out, self.seq, self.act, self.ract = backwards, zero_out, seq, act, ract
        self.saved = None  # (G, Hp, Cp) of the last forward, kept only when a trace is asked for

    @classmethod
    def of(cls, p: Recurrence) -> "_Cfg":
        return cls(bool(p.go_backwards), bool(p.zero_output_for_mask), bool(p.return_sequences),
                   _code(p.cell.activation), _code(p.cell.recurrent_activation))

    @classmethod
    def one_step(cls, act: int, ract: int) -> "_Cfg":
        """A cell call's: the last output, no mask, no trace (so `saved` stays None and one
        config serves every call)."""
        return cls(False, False, False, act, ract)


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask):
        ext = native.module
        y, hT, cT, G, Hp, Cp = ext.forward(x.detach(), kernel.detach(), R.detach(),
                                           None if bias is None else bias.detach(), h0.detach(), c0.detach(),
                                           in_drop, rec_drop, mask, cfg.backwards, cfg.zero_out, cfg.seq,
                                           cfg.act, cfg.ract, True)
        ctx.cfg = cfg
        ctx.has_bias = bias is not None
        ctx.extra = (in_drop, rec_drop, mask)
        ctx.save_for_backward(x, kernel, R, G, Hp, Cp)
        if cfg.saved is not None:  # a trace was asked for: hand the saved buffers to run()
            cfg.saved = (G, Hp, Cp)
        return y, hT, cT

    @staticmethod
    def backward(ctx, dY, dhT, dcT):
        cfg = ctx.cfg
        x, kernel, R, G, Hp, Cp = ctx.saved_tensors
        in_drop, rec_drop, mask = ctx.extra
        n = ctx.needs_input_grad  # cfg, x, kernel, R, bias, h0, c0, ...
        needs = [n[1], n[2], n[3], n[4] and ctx.has_bias, n[5], n[6]]
        dX, dK, dR, db, dh0, dc0 = native.module.backward(dY, dhT, dcT, x.detach(), kernel.detach(), R.detach(), G, Hp, Cp,
                                                 in_drop, rec_drop, mask, cfg.backwards, cfg.zero_out, cfg.seq,
                                                 cfg.act, cfg.ract, needs)
        return (None, dX, dK, dR, db if needs[3] else None, dh0 if n[5] else None, dc0 if n[6] else None,
                None, None, None)


# ----- torch.compile: the same kernel as two custom ops (forward, backward) -----------------------
# Eager calls go through the autograd.Function above: the custom-op Python dispatch costs more
# (measured at batch 1, T=1 with grad: ~40 us per call vs ~16 us for the Function). Under
# torch.compile the ops below are used instead, so Dynamo traces through without a graph break.
_ops = None


def _compile_ops():
    global _ops
    if _ops is not None:
        return _ops

    @torch.library.custom_op("lstm::fused_cpp_forward", mutates_args=())
    def fwd(x: Tensor, kernel: Tensor, R: Tensor, bias: Optional[Tensor], h0: Tensor, c0: Tensor,
            in_drop: Optional[Tensor], rec_drop: Optional[Tensor], mask: Optional[Tensor], backwards: bool,
            zero_out: bool, seq: bool, act: int, ract: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        outs = extension().forward(x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, backwards, zero_out, seq,
                                   act, ract, True)
        return tuple(t.clone() if t is x else t.contiguous() for t in outs)

    @fwd.register_fake
    def _(x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, backwards, zero_out, seq, act, ract):
        B, T, _ = x.shape
        U = R.shape[0]
        y = x.new_empty(B, T, U) if seq else x.new_empty(B, U)
        return y, x.new_empty(B, U), x.new_empty(B, U), x.new_empty(B, T, 4 * U), x.new_empty(B, T, U), x.new_empty(B, T, U)

    @torch.library.custom_op("lstm::fused_cpp_backward", mutates_args=())
    def bwd(dY: Optional[Tensor], dhT: Optional[Tensor], dcT: Optional[Tensor], x: Tensor, kernel: Tensor, R: Tensor,
            G: Tensor, Hp: Tensor, Cp: Tensor, in_drop: Optional[Tensor], rec_drop: Optional[Tensor],
            mask: Optional[Tensor], backwards: bool, zero_out: bool, seq: bool, act: int, ract: int,
            needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(dx, dkernel, dR, dbias, dh0, dc0), each empty where `needs` (same order) is False."""
        grads = extension().backward(dY, dhT, dcT, x, kernel, R, G, Hp, Cp, in_drop, rec_drop, mask, backwards,
                                     zero_out, seq, act, ract, needs)
        return tuple(t.contiguous() if need else x.new_empty(0) for t, need in zip(grads, needs))

    @bwd.register_fake
    def _(dY, dhT, dcT, x, kernel, R, G, Hp, Cp, in_drop, rec_drop, mask, backwards, zero_out, seq, act, ract, needs):
        B = x.shape[0]
        U = R.shape[0]
        # (contiguous, as the real outputs: inductor checks the strides)
        shapes = (x.shape, kernel.shape, R.shape, (4 * U,), (B, U), (B, U))
        return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))

    def setup_context(ctx, inputs, output):
        x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, backwards, zero_out, seq, act, ract = inputs
        ctx.flags = (backwards, zero_out, seq, act, ract)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, kernel, R, output[3], output[4], output[5], in_drop, rec_drop, mask)

    def backward(ctx, dY, dhT, dcT, *_):
        x, kernel, R, G, Hp, Cp, in_drop, rec_drop, mask = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:6])  # x, kernel, R, bias, h0, c0: only what autograd asks for
        needs[3] = needs[3] and ctx.has_bias
        grads = bwd(dY, dhT, dcT, x, kernel, R, G, Hp, Cp, in_drop, rec_drop, mask, *ctx.flags, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 8

    fwd.register_autograd(backward, setup_context=setup_context)

    @torch.library.custom_op("lstm::fused_cpp_inference", mutates_args=())
    def inference(x: Tensor, kernel: Tensor, R: Tensor, bias: Optional[Tensor], h0: Tensor, c0: Tensor,
                  in_drop: Optional[Tensor], rec_drop: Optional[Tensor], mask: Optional[Tensor], backwards: bool,
                  zero_out: bool, seq: bool, act: int, ract: int) -> tuple[Tensor, Tensor, Tensor]:
        """Without grad: the forward that saves nothing (and its faster routes)."""
        outs = extension().forward(x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, backwards, zero_out, seq,
                                   act, ract, False)
        return tuple(t.clone() if t is x else t.contiguous() for t in outs)

    @inference.register_fake
    def _(x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, backwards, zero_out, seq, act, ract):
        B, T, _ = x.shape
        U = R.shape[0]
        return x.new_empty(B, T, U) if seq else x.new_empty(B, U), x.new_empty(B, U), x.new_empty(B, U)

    _ops = (fwd, bwd, inference)
    return _ops


_compile_ops()  # Python definitions only (no C++ build): Dynamo cannot trace their creation


def _detached(t):
    return None if t is None else t.detach()


TRACE_KEYS = ("i", "f", "c_tilde", "c", "o", "h")


def _trace(p: Recurrence, G: Tensor, Hp: Tensor, Cp: Tensor, hT: Tensor, cT: Tensor) -> dict:
    """The reference's per-step internals, in processing order, from the saving forward's
    buffers: G the activated gates [B,T,4U], Hp/Cp the states before the step of each time index."""
    G, Hp, Cp, hT, cT = (t.detach() for t in (G, Hp, Cp, hT, cT))
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


def _empty_trace(p: Recurrence) -> dict:
    x = p.inputs
    return {k: x.new_zeros(x.shape[0], 0, p.units) for k in TRACE_KEYS}


def run(p: Recurrence) -> RecurrenceResult:
    x = p.inputs
    T = x.shape[1]
    if T == 0:
        U = p.units
        out = x.new_zeros(x.shape[0], 0, U) if p.return_sequences else x.new_zeros(x.shape[0], U)
        return RecurrenceResult(out, tuple(p.initial_state), _empty_trace(p) if p.trace else None)
    cfg = _Cfg.of(p)
    h0, c0 = p.initial_state
    in_drop, rec_drop, mask = _detached(p.input_dropout), _detached(p.recurrent_dropout), p.mask
    grad = torch.is_grad_enabled() and (x.requires_grad or p.kernel.requires_grad or p.recurrent_kernel.requires_grad
                                        or (p.bias is not None and p.bias.requires_grad) or h0.requires_grad
                                        or c0.requires_grad)
    if torch.compiler.is_compiling():  # torch.compile / torch.export: the custom ops
        args = (x, p.kernel, p.recurrent_kernel, p.bias, h0, c0, in_drop, rec_drop, mask, cfg.backwards, cfg.zero_out,
                cfg.seq, cfg.act, cfg.ract)
        if not (grad or p.trace):
            y, hT, cT = _ops[2](*args)
            return RecurrenceResult(y, (hT, cT))
        y, hT, cT, G, Hp, Cp = _ops[0](*args)
        return RecurrenceResult(y, (hT, cT), _trace(p, G, Hp, Cp, hT, cT) if p.trace else None)
    if p.trace:
        cfg.saved = ()
    if grad:
        y, hT, cT = _LSTMFunction.apply(cfg, x, p.kernel, p.recurrent_kernel, p.bias, h0, c0, in_drop, rec_drop, mask)
    elif p.trace:  # inference with a trace: the saving forward
        y, hT, cT, *cfg.saved = native.module.forward(x.detach(), p.kernel.detach(), p.recurrent_kernel.detach(),
                                             _detached(p.bias), h0.detach(), c0.detach(), in_drop, rec_drop, mask,
                                             cfg.backwards, cfg.zero_out, cfg.seq, cfg.act, cfg.ract, True)
    else:
        y, hT, cT = native.module.forward(x.detach(), p.kernel.detach(), p.recurrent_kernel.detach(), _detached(p.bias),
                                 h0.detach(), c0.detach(), in_drop, rec_drop, mask, cfg.backwards, cfg.zero_out,
                                 cfg.seq, cfg.act, cfg.ract, False)
    if p.trace:
        saved, cfg.saved = cfg.saved, None  # (the graph keeps cfg: let go of the buffers)
        return RecurrenceResult(y, (hT, cT), _trace(p, *saved, hT, cT))
    return RecurrenceResult(y, (hT, cT))
