"""The fused CPU kernel: one matrix product for the input projection of every step, then one
fused loop (Numba) over the steps, and a backward pass derived by hand (BPTT over the saved
gates) instead of autograd through the steps.

    forward   xw = x @ kernel + b            one product over [T*B, D] (dropout masks first)
              per step: z = xw_t + h @ R;  gates, state and output fused in one pass
    backward  per step (reverse): dZ_t from the saved gates, dh_{t-1} = dZ_t @ R^T
              then dR = H_prev^T @ dZ, dkernel = x^T @ dZ, dx = dZ @ kernel^T, db = ΣdZ,
              each one product over all steps

Supported: LSTM, GRU (reset_after True/False) and SimpleRNN on CPU float32/float64 tensors with
named activations (tanh, sigmoid, relu, linear, hard_sigmoid, hard_sigmoid_tf_keras), with
every option of a plain `Recurrence` (no LSTM variant).

Traces (`trace=True`): derived from what the forward keeps anyway (the activated gates of every
step, masked steps included, and the states before/after each step; SimpleRNN with a mask also
keeps every step's output): fresh [B, T, U] tensors, equal to the reference's. A call without a
trace is unchanged. The traces are detached (no gradient flows back through them; the outputs
and states stay differentiable): for gradients through gate values use the reference kernel
(`lstm.kernels.use("reference")`).
Numba is imported and the loops compiled (once, cached on disk) on the first call.

Autograd: eager calls use a torch.autograd.Function; under torch.compile and torch.export the same
forward and backward run as the custom ops lstm::fused_cpu_forward / lstm::fused_cpu_backward
(fake kernels and autograd registered; lstm::fused_cpu_inference when nothing needs grad), so the
graph has no break.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .problem import Recurrence, RecurrenceResult

name = "fused_cpu"

ACT_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "linear": 3, "hard_sigmoid": 4, "hard_sigmoid_tf_keras": 5}
_DTYPES = (torch.float32, torch.float64)
_HAS_NUMBA = importlib.util.find_spec("numba") is not None
_nb = None


def _numba():
    global _nb
    if _nb is None:
        from . import _numba_rnn

        _nb = _numba_rnn
        _find_blas_threads()
    return _nb


# Numba's np.dot calls SciPy's OpenBLAS, whose worker threads fight torch's OpenMP threads
# (both spin-wait) on small per-step products. The loops therefore run with a thread-local
# BLAS thread count of 1 (restored after the call) unless the per-step product is large.
_blas_local = None
_BLAS_THREADED_WORK = 1 << 62  # multiply-adds per step above which BLAS may use its threads (measured: never)


def _find_blas_threads():
    global _blas_local
    _blas_local = False
    try:
        import ctypes
        import glob
        import os

        import scipy

        libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
        for path in glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")):
            fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = ctypes.c_int
                _blas_local = fn
                return
    except Exception:  # pragma: no cover - any other BLAS: leave its threads alone
        _blas_local = False


def _call(work: int, fn, *args):
    """fn(*args) with single-threaded BLAS when the per-step work is small."""
    setter = _blas_local
    if not setter or work > _BLAS_THREADED_WORK:
        return fn(*args)
    previous = setter(1)
    try:
        return fn(*args)
    finally:
        setter(previous)


def _code(activation) -> Optional[int]:
    return ACT_CODES.get(activation) if isinstance(activation, str) else None


def supports(p: Recurrence) -> bool:
    if not p.plain or not _HAS_NUMBA:
        return False
    cell = p.cell
    if cell.kind not in ("lstm", "gru", "simple_rnn") or _code(cell.activation) is None:
        return False
    if cell.kind != "simple_rnn" and _code(cell.recurrent_activation) is None:
        return False
    dtype = p.inputs.dtype
    if dtype not in _DTYPES:
        return False
    tensors = [p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.input_dropout, p.recurrent_dropout,
               *p.initial_state]
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != dtype):
            return False
    if p.mask is not None and p.mask.device.type != "cpu":
        return False
    return len(p.initial_state) == cell.state_count


# ----- helpers ------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _time_major(x: torch.Tensor, backwards: bool) -> torch.Tensor:
    xt = x.transpose(0, 1)
    if backwards:
        xt = xt.flip(0)
    return xt.contiguous()


def _blocks(w: torch.Tensor, gates: int):
    return w.chunk(gates, dim=-1)


def _input_projection(xt2d, kernel, b_in, in_drop_tb, gates):
    """xt2d [T*B, D] time-major; in_drop_tb None or [G', T*B, D]-broadcastable masks."""
    if in_drop_tb is None:
        return torch.mm(xt2d, kernel) if b_in is None else torch.addmm(b_in, xt2d, kernel)
    if in_drop_tb.shape[0] == 1:
        xm = xt2d * in_drop_tb[0]
        return torch.mm(xm, kernel) if b_in is None else torch.addmm(b_in, xm, kernel)
    ks = _blocks(kernel, gates)
    bs = _blocks(b_in, gates) if b_in is not None else [None] * gates
    parts = [torch.mm(xt2d * in_drop_tb[g], ks[g]) if bs[g] is None else torch.addmm(bs[g], xt2d * in_drop_tb[g], ks[g])
             for g in range(gates)]
    return torch.cat(parts, dim=1)


_EMPTY_KEEP = np.zeros((0, 0), dtype=np.uint8)


class _Cfg:
    __slots__ = ("kind", "act", "ract", "reset_after", "backwards", "zero_out", "seq", "gates", "trace")

    def __init__(self, kind: str, act: int, ract: int, reset_after: bool, backwards: bool, zero_out: bool,
                 seq: bool, trace: bool = False):
        self.kind = kind
        self.act = act
        self.ract = ract
        self.reset_after = reset_after
        self.backwards = backwards
        self.zero_out = zero_out
        self.seq = seq
        self.gates = GATES[kind]
        # asked for a trace: the forward replaces True by its arrays (keep, Hs, per-cell extras)
        self.trace = True if trace else None

    @classmethod
    def of(cls, p: Recurrence) -> "_Cfg":
        cell = p.cell
        return cls(cell.kind, _code(cell.activation), _code(cell.recurrent_activation) if cell.kind != "simple_rnn" else 0,
                   bool(cell.reset_after), bool(p.go_backwards), bool(p.zero_output_for_mask),
                   bool(p.return_sequences), bool(p.trace))

    def flags(self) -> tuple:
        return (self.kind, self.act, self.ract, self.reset_after, self.backwards, self.zero_out, self.seq)


GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


def _keep(mask, backwards: bool) -> np.ndarray:
    """The step mask in processing order, time-major, as uint8 [T, B] (shape (0, 0): none)."""
    if mask is None:
        return _EMPTY_KEEP
    keep_t = mask.detach().t()
    if backwards:
        keep_t = keep_t.flip(0)
    return keep_t.to(torch.bool).contiguous().numpy().view(np.uint8)


def _input_drop_tb(in_drop, T: int):
    """[G', B, D] input-dropout masks broadcast over time in the [T*B, D] layout."""
    if in_drop is None:
        return None
    G_, B, D = in_drop.shape
    return in_drop.detach().unsqueeze(1).expand(-1, T, -1, -1).reshape(G_, T * B, D)


def _forward(cfg: _Cfg, x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, save: bool):
    nb = _numba()
    B, T, D = x.shape
    U = R.shape[0]
    G = cfg.gates
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    in_drop_tb = None
    bias_d = None if bias is None else bias.detach()
    b_in = None if bias_d is None else (bias_d[0] if bias_d.dim() == 2 else bias_d)
    if in_drop is None and T * B > 0:
        # time-major copy and x @ kernel + b in one Numba call (no torch op right before the loop)
        xt_np = np.empty((T, B, D), dtype=npdt)
        xw_np = np.empty((T * B, G * U), dtype=npdt)
        b_np = _np(b_in) if b_in is not None else np.zeros(0, dtype=npdt)
        _call(0, nb.project, _np(x), _np(kernel), b_np, cfg.backwards, xt_np, xw_np)
        xt2d = torch.from_numpy(xt_np).view(T * B, D)
        xw_np = xw_np.reshape(T, B, G * U)
    else:
        xt = _time_major(x.detach(), cfg.backwards)
        xt2d = xt.view(T * B, D)
        in_drop_tb = _input_drop_tb(in_drop, T)
        with torch.no_grad():
            xw = _input_projection(xt2d, kernel.detach(), b_in, in_drop_tb, G)
        xw_np = xw.numpy().reshape(T, B, G * U)
    R_np = _np(R)
    keep = _keep(mask, cfg.backwards)
    rd = _np(rec_drop) if rec_drop is not None else np.zeros((0, 0, 0), dtype=npdt)

    Y = np.empty((B, T, U), dtype=npdt)
    Hs = np.empty((T + 1, B, U), dtype=npdt)
    Hs[0] = h0.detach().numpy()
    saved = None
    if cfg.kind == "lstm":
        Cs = np.empty((T + 1, B, U), dtype=npdt)
        Cs[0] = c0.detach().numpy()
        Gs = np.empty((T, B, G * U), dtype=npdt)
        TC = np.empty((T, B, U), dtype=npdt)
        _call(B * U * G * U, nb.lstm_forward, xw_np, R_np, rd, keep, cfg.zero_out, cfg.act, cfg.ract, Y, Hs, Cs, Gs, TC)
        states = (torch.from_numpy(Hs[T].copy()), torch.from_numpy(Cs[T].copy()))
        arrays = (Hs, Cs, Gs, TC)
    elif cfg.kind == "gru":
        brec = np.zeros(0, dtype=npdt)
        if bias_d is not None and bias_d.dim() == 2:
            brec = _np(bias_d[1])
        Gs = np.empty((T, B, G * U), dtype=npdt)
        EX = np.empty((T, B, U), dtype=npdt)
        rec = np.empty((B, G * U), dtype=npdt)
        _call(B * U * G * U, nb.gru_forward, xw_np, R_np, brec, rd, keep, cfg.zero_out, cfg.act, cfg.ract, cfg.reset_after,
                       Y, Hs, Gs, EX, rec)
        states = (torch.from_numpy(Hs[T].copy()),)
        arrays = (Hs, Gs, EX)
    else:
        Z = np.empty((T, B, U) if (cfg.trace and mask is not None) else (0, 0, 0), dtype=npdt)
        _call(B * U * G * U, nb.rnn_forward, xw_np, R_np, rd, keep, cfg.zero_out, cfg.act, Y, Hs, Z)
        states = (torch.from_numpy(Hs[T].copy()),)
        arrays = (Hs,)
    out = torch.from_numpy(Y) if cfg.seq else torch.from_numpy(Y[:, T - 1].copy())
    if cfg.trace:
        extra = {"lstm": lambda: (Cs, Gs, TC), "gru": lambda: (Gs,), "simple_rnn": lambda: (Z,)}[cfg.kind]()
        cfg.trace = (keep if mask is not None else None, Hs, *extra)
    if save:
        saved = arrays + (xt2d, in_drop_tb, keep, rd, R_np)
    return (out, *states), saved


TRACE_KEYS = {"lstm": ("i", "f", "c_tilde", "c", "o", "h"), "gru": ("z", "r", "h_tilde", "h"), "simple_rnn": ("h",)}


def _trace_of_arrays(kind: str, keep, *arrays) -> dict:
    kept = None if keep is None else torch.from_numpy(keep).to(torch.bool)
    return _trace(kind, kept, *(torch.from_numpy(a) for a in arrays))


def _trace(kind: str, kept, H, *extra) -> dict:
    """The reference's per-step internals from the forward's buffers (time-major, processing
    order): H [T+1, B, U] the states, kept [T, B] bool or None; LSTM Cs, G (activated gates),
    TC (act(c) of every step's own c); GRU G; SimpleRNN Z (every step's output, with a mask)."""
    kept = None if kept is None else kept[:, :, None]
    if kind == "lstm":
        Cs, G, TC = extra
        i, f, c_tilde, o = G.chunk(4, dim=-1)
        c = Cs[1:]
        if kept is not None:  # a masked step kept the state; its trace is the step's own values
            c = torch.where(kept, c, f * Cs[:-1] + i * c_tilde)
        values = (i, f, c_tilde, c, o, o * TC)
    elif kind == "gru":
        (G,) = extra
        z, r, h_tilde = G.chunk(3, dim=-1)
        h = H[1:]
        if kept is not None:
            h = torch.where(kept, h, z * H[:-1] + (1 - z) * h_tilde)
        values = (z, r, h_tilde, h)
    else:
        values = (H[1:] if kept is None else extra[0],)
    # fresh batch-major tensors: never views of the arrays the backward reads
    return {k: v.transpose(0, 1).clone(memory_format=torch.contiguous_format)
            for k, v in zip(TRACE_KEYS[kind], values)}


def _grad_numpy(g: Optional[torch.Tensor], shape, npdt) -> np.ndarray:
    if g is None:
        return np.zeros(shape, dtype=npdt)
    return np.array(g.detach().numpy() if g.is_contiguous() else g.detach().contiguous().numpy(), dtype=npdt)


def _weight_grad_rec(Hprev2d, dZr2d, rd, gates, U, T, B):
    """dR = Σ_t (h_{t-1} * rd_g)^T @ dZ_g, blocks per gate with recurrent dropout."""
    if rd.shape[0] == 0:
        return Hprev2d.t().mm(dZr2d)
    rdt = torch.from_numpy(rd)
    parts = []
    for g in range(gates):
        hm = (Hprev2d.view(T, B, U) * rdt[g]).view(T * B, U)
        parts.append(hm.t().mm(dZr2d[:, g * U:(g + 1) * U]))
    return torch.cat(parts, dim=1)


def _backward(cfg: _Cfg, saved: tuple, kernel, shapes, needs, dY, dhT, dcT):
    """BPTT over the forward's saved arrays; needs: which of (x, kernel, R, bias, h0, c0) to
    compute. Returns their gradients (None where not needed)."""
    nb = _numba()
    (B, T, D), U, bias_dim = shapes
    G = cfg.gates
    GU = G * U
    npdt = np.float32 if kernel.dtype == torch.float32 else np.float64
    needs = (None, *needs)  # (the indices of autograd's needs_input_grad: cfg, x, kernel, R, bias, h0, c0)
    if dY is None:
        dY_np = np.zeros((B, T if cfg.seq else 1, U), dtype=npdt)
    else:
        dY_np = np.ascontiguousarray(dY.detach().numpy(), dtype=npdt).reshape(B, T if cfg.seq else 1, U)
    dh = _grad_numpy(dhT, (B, U), npdt)
    if cfg.kind == "lstm":
        Hs, Cs, Gs, TC, xt2d, in_drop_tb, keep, rd, R_np = saved
        dc = _grad_numpy(dcT, (B, U), npdt)
        dZ = np.empty((T, B, GU), dtype=npdt)
        RT = np.ascontiguousarray(R_np.T)
        _call(B * U * GU, nb.lstm_backward, dY_np, cfg.seq, dh, dc, Cs, Gs, TC, RT, rd, keep, cfg.zero_out, cfg.act, cfg.ract, dZ)
        dZx = dZr = torch.from_numpy(dZ).view(T * B, GU)
        Hprev2d = torch.from_numpy(Hs[:T]).view(T * B, U)
        dR = _weight_grad_rec(Hprev2d, dZr, rd, G, U, T, B) if needs[3] else None
        db = dZx.sum(0) if (needs[4] and bias_dim is not None) else None
        dc0 = torch.from_numpy(dc) if needs[6] else None
    elif cfg.kind == "gru":
        Hs, Gs, EX, xt2d, in_drop_tb, keep, rd, R_np = saved
        dZx_np = np.empty((T, B, GU), dtype=npdt)
        dZr_np = np.empty((T, B, GU), dtype=npdt)
        RT = np.ascontiguousarray(R_np.T)
        _call(B * U * GU, nb.gru_backward, dY_np, cfg.seq, dh, Hs, Gs, EX, RT, rd, keep, cfg.zero_out, cfg.act, cfg.ract,
                        cfg.reset_after, dZx_np, dZr_np)
        dZx = torch.from_numpy(dZx_np).view(T * B, GU)
        dZr = torch.from_numpy(dZr_np).view(T * B, GU)
        Hprev2d = torch.from_numpy(Hs[:T]).view(T * B, U)
        dR = None
        if needs[3]:
            if cfg.reset_after:
                dR = _weight_grad_rec(Hprev2d, dZr, rd, G, U, T, B)
            else:
                d_zr = _weight_grad_rec(Hprev2d, dZr[:, : 2 * U], rd[:2] if rd.shape[0] else rd, 2, U, T, B)
                d_h = torch.from_numpy(EX).view(T * B, U).t().mm(dZr[:, 2 * U:])
                dR = torch.cat([d_zr, d_h], dim=1)
        db = None
        if needs[4] and bias_dim is not None:
            db = torch.stack([dZx.sum(0), dZr.sum(0)]) if bias_dim == 2 else dZx.sum(0)
        dc0 = None
    else:
        Hs, xt2d, in_drop_tb, keep, rd, R_np = saved
        dZ = np.empty((T, B, GU), dtype=npdt)
        RT = np.ascontiguousarray(R_np.T)
        _call(B * U * GU, nb.rnn_backward, dY_np, cfg.seq, dh, Hs, RT, rd, keep, cfg.zero_out, cfg.act, dZ)
        dZx = dZr = torch.from_numpy(dZ).view(T * B, GU)
        Hprev2d = torch.from_numpy(Hs[:T]).view(T * B, U)
        dR = _weight_grad_rec(Hprev2d, dZr, rd, G, U, T, B) if needs[3] else None
        db = dZx.sum(0) if (needs[4] and bias_dim is not None) else None
        dc0 = None

    dK = dX = None
    if needs[2]:
        if in_drop_tb is None:
            dK = xt2d.t().mm(dZx)
        elif in_drop_tb.shape[0] == 1:
            dK = (xt2d * in_drop_tb[0]).t().mm(dZx)
        else:
            dK = torch.cat([(xt2d * in_drop_tb[g]).t().mm(dZx[:, g * U:(g + 1) * U]) for g in range(G)], dim=1)
    if needs[1]:
        if in_drop_tb is None:
            dxt = dZx.mm(kernel.t())
        elif in_drop_tb.shape[0] == 1:
            dxt = dZx.mm(kernel.t()) * in_drop_tb[0]
        else:
            ks = _blocks(kernel, G)
            dxt = sum(dZx[:, g * U:(g + 1) * U].mm(ks[g].t()) * in_drop_tb[g] for g in range(G))
        dxt = dxt.view(T, B, D)
        if cfg.backwards:
            dxt = dxt.flip(0)
        dX = dxt.transpose(0, 1)
    dh0 = torch.from_numpy(dh) if needs[5] else None
    return dX, dK, dR, db, dh0, dc0


class _FusedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask):
        outs, saved = _forward(cfg, x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, save=True)
        ctx.cfg = cfg
        ctx.saved = saved
        ctx.shapes = (tuple(x.shape), R.shape[0], None if bias is None else bias.dim())
        ctx.save_for_backward(kernel)
        return outs

    @staticmethod
    def backward(ctx, dY, dhT, *rest):
        (kernel,) = ctx.saved_tensors
        grads = _backward(ctx.cfg, ctx.saved, kernel, ctx.shapes, ctx.needs_input_grad[1:7], dY, dhT,
                          rest[0] if rest else None)
        return (None, *grads, None, None, None)


# ----- torch.compile / torch.export: the same kernel as two custom ops (forward, backward) -------
# Eager calls go through the autograd.Function above (no custom-op dispatch cost). Under
# torch.compile and torch.export (torch.compiler.is_compiling()) the ops below run instead, so
# the graph has no break: they take and return tensors only (the forward's saved arrays become
# outputs; the backward recomputes the cheap time-major copies), their fake kernels give the
# shapes, and the backward op is the forward's registered autograd formula.
def _empty(x):
    return x.new_empty(0)


@torch.library.custom_op("lstm::fused_cpu_forward", mutates_args=())
def _op_forward(x: Tensor, kernel: Tensor, R: Tensor, bias: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
                in_drop: Optional[Tensor], rec_drop: Optional[Tensor], mask: Optional[Tensor], kind: str, act: int,
                ract: int, reset_after: bool, backwards: bool, zero_out: bool, seq: bool,
                trace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, hT, cT, Hs, Cs, G, X, Z): outputs and final states (cT empty unless LSTM), then the
    saved arrays (Hs [T+1,B,U]; LSTM Cs [T+1,B,U]; LSTM/GRU G [T,B,G*U] and X [T,B,U] (TC/EX);
    SimpleRNN with trace and mask Z [T,B,U]; empty where not used)."""
    cfg = _Cfg(kind, act, ract, reset_after, backwards, zero_out, seq, trace)
    outs, saved = _forward(cfg, x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, save=True)
    y, hT = outs[0], outs[1]
    cT = outs[2] if kind == "lstm" else _empty(x)
    arrays = [torch.from_numpy(a) for a in saved[:{"lstm": 4, "gru": 3, "simple_rnn": 1}[kind]]]
    if kind == "lstm":
        Hs, Cs, G, X = arrays
    elif kind == "gru":
        (Hs, G, X), Cs = arrays, _empty(x)
    else:
        (Hs,), Cs, G, X = arrays, _empty(x), _empty(x), _empty(x)
    Z = torch.from_numpy(cfg.trace[-1]) if (trace and kind == "simple_rnn" and mask is not None) else _empty(x)
    return y.contiguous(), hT, cT, Hs, Cs, G, X, Z


@_op_forward.register_fake
def _(x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, kind, act, ract, reset_after, backwards, zero_out, seq,
      trace):
    B, T, _ = x.shape
    U, GU = R.shape
    lstm = kind == "lstm"
    return (x.new_empty(B, T, U) if seq else x.new_empty(B, U), x.new_empty(B, U),
            x.new_empty(B, U) if lstm else _empty(x), x.new_empty(T + 1, B, U),
            x.new_empty(T + 1, B, U) if lstm else _empty(x),
            x.new_empty(T, B, GU) if kind != "simple_rnn" else _empty(x),
            x.new_empty(T, B, U) if kind != "simple_rnn" else _empty(x),
            x.new_empty(T, B, U) if (trace and kind == "simple_rnn" and mask is not None) else _empty(x))


@torch.library.custom_op("lstm::fused_cpu_backward", mutates_args=())
def _op_backward(dY: Optional[Tensor], dhT: Optional[Tensor], dcT: Optional[Tensor], x: Tensor, kernel: Tensor,
                 R: Tensor, bias_dim: int, Hs: Tensor, Cs: Tensor, G: Tensor, X: Tensor, in_drop: Optional[Tensor],
                 rec_drop: Optional[Tensor], mask: Optional[Tensor], kind: str, act: int, ract: int,
                 reset_after: bool, backwards: bool, zero_out: bool, seq: bool,
                 needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dkernel, dR, dbias, dh0, dc0), each empty where `needs` (same order) is False."""
    cfg = _Cfg(kind, act, ract, reset_after, backwards, zero_out, seq)
    B, T, D = x.shape
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    arrays = {"lstm": (Hs, Cs, G, X), "gru": (Hs, G, X), "simple_rnn": (Hs,)}[kind]
    rd = _np(rec_drop) if rec_drop is not None else np.zeros((0, 0, 0), dtype=npdt)
    saved = tuple(_np(a) for a in arrays) + (_time_major(x.detach(), backwards).view(T * B, D),
                                            _input_drop_tb(in_drop, T), _keep(mask, backwards), rd, _np(R))
    grads = _backward(cfg, saved, kernel.detach(), ((B, T, D), R.shape[0], bias_dim or None), needs, dY, dhT, dcT)
    return tuple(g.contiguous() if need else _empty(x) for g, need in zip(grads, needs))


@_op_backward.register_fake
def _(dY, dhT, dcT, x, kernel, R, bias_dim, Hs, Cs, G, X, in_drop, rec_drop, mask, kind, act, ract, reset_after,
      backwards, zero_out, seq, needs):
    B = x.shape[0]
    U, GU = R.shape
    # (contiguous, as the real outputs: inductor checks the strides)
    shapes = (x.shape, kernel.shape, R.shape, (GU,) if bias_dim == 1 else (2, GU), (B, U), (B, U))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, kind, act, ract, reset_after, backwards, zero_out, seq, _ = inputs
    ctx.flags = (kind, act, ract, reset_after, backwards, zero_out, seq)
    ctx.bias_dim = 0 if bias is None else bias.dim()
    ctx.save_for_backward(x, kernel, R, *output[3:7], in_drop, rec_drop, mask)


def _op_autograd(ctx, dY, dhT, dcT, *_):
    x, kernel, R, Hs, Cs, G, X, in_drop, rec_drop, mask = ctx.saved_tensors
    lstm = ctx.flags[0] == "lstm"
    needs = list(ctx.needs_input_grad[:6])  # x, kernel, R, bias, h0, c0: only what autograd asks for
    needs[3] = needs[3] and ctx.bias_dim > 0
    needs[5] = needs[5] and lstm
    grads = _op_backward(dY, dhT, dcT if lstm else None, x, kernel, R, ctx.bias_dim, Hs, Cs, G, X, in_drop, rec_drop,
                         mask, *ctx.flags, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 11


_op_forward.register_autograd(_op_autograd, setup_context=_setup_context)


@torch.library.custom_op("lstm::fused_cpu_inference", mutates_args=())
def _op_inference(x: Tensor, kernel: Tensor, R: Tensor, bias: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
                  in_drop: Optional[Tensor], rec_drop: Optional[Tensor], mask: Optional[Tensor], kind: str, act: int,
                  ract: int, reset_after: bool, backwards: bool, zero_out: bool,
                  seq: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Without grad: (y, hT, cT), cT empty unless LSTM."""
    cfg = _Cfg(kind, act, ract, reset_after, backwards, zero_out, seq)
    outs, _ = _forward(cfg, x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, save=False)
    return outs[0].contiguous(), outs[1], outs[2] if kind == "lstm" else _empty(x)


@_op_inference.register_fake
def _(x, kernel, R, bias, h0, c0, in_drop, rec_drop, mask, kind, act, ract, reset_after, backwards, zero_out, seq):
    B, T, _ = x.shape
    U = R.shape[0]
    return (x.new_empty(B, T, U) if seq else x.new_empty(B, U), x.new_empty(B, U),
            x.new_empty(B, U) if kind == "lstm" else _empty(x))


def _run_compiling(p: Recurrence, cfg: _Cfg, h0, c0, grad: bool) -> RecurrenceResult:
    """The custom-op route (torch.compile / torch.export)."""
    detached = [None if t is None else t.detach() for t in (p.input_dropout, p.recurrent_dropout)]
    if not (grad or p.trace):
        y, hT, cT = _op_inference(p.inputs, p.kernel, p.recurrent_kernel, p.bias, h0, c0, *detached, p.mask,
                                  *cfg.flags())
        return RecurrenceResult(y, (hT, cT) if cfg.kind == "lstm" else (hT,))
    y, hT, cT, Hs, Cs, G, X, Z = _op_forward(p.inputs, p.kernel, p.recurrent_kernel, p.bias, h0, c0, *detached,
                                             p.mask, *cfg.flags(), bool(p.trace))
    states = (hT, cT) if cfg.kind == "lstm" else (hT,)
    trace = None
    if p.trace:  # detached, as in eager
        kept = None
        if p.mask is not None:
            kept = p.mask.t().to(torch.bool)
            kept = kept.flip(0) if cfg.backwards else kept
        extra = {"lstm": (Cs, G, X), "gru": (G,), "simple_rnn": (Z,)}[cfg.kind]
        trace = _trace(cfg.kind, kept, Hs.detach(), *(e.detach() for e in extra))
    return RecurrenceResult(y, states, trace)


def run(p: Recurrence) -> RecurrenceResult:
    x = p.inputs
    B, T = x.shape[0], x.shape[1]
    U = p.units
    if T == 0:
        out = x.new_zeros(B, 0, U) if p.return_sequences else x.new_zeros(B, U)
        trace = {k: x.new_zeros(B, 0, U) for k in TRACE_KEYS[p.cell.kind]} if p.trace else None
        return RecurrenceResult(out, tuple(p.initial_state), trace)
    cfg = _Cfg.of(p)
    h0 = p.initial_state[0]
    c0 = p.initial_state[1] if cfg.kind == "lstm" else None
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, p.kernel, p.recurrent_kernel, p.bias, h0, c0))
    if torch.compiler.is_compiling():
        return _run_compiling(p, cfg, h0, c0, grad)
    args = (x, p.kernel, p.recurrent_kernel, p.bias, h0, c0, p.input_dropout, p.recurrent_dropout, p.mask)
    if grad:
        outs = _FusedRecurrence.apply(cfg, *args)
    else:
        outs, _ = _forward(cfg, *args, save=False)
    trace = None
    if p.trace:
        trace = _trace_of_arrays(cfg.kind, *cfg.trace)
        cfg.trace = None  # (the graph keeps cfg: let go of the arrays)
    return RecurrenceResult(outs[0], tuple(outs[1:]), trace)
