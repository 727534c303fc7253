"""The fused kernel for the LSTM variants (peephole, layer_norm, proj_size, coupled, forget_bias,
cell_clip, zoneout): the options of the LSTM's one C++ recurrence (csrc/lstm.cpp), as fused_cpp's
plain cell is.

The GEMMs over all steps run here, in torch: xk = x @ kernel (dropout masks first) before the
recurrence; after it dkernel = x^T dxk, dx = dxk kernel^T, dR = Hp^T dA and dP = Hu^T dr. Everything
per step runs in C++, forward and hand-derived backward: the bias (forget_bias included), the
input layer norm LN(xk) g_x (xk is saved with its rows' mean and 1/std, and normalised again in
the backward), the recurrence; it sums the gradients of the bias, the gains and the peepholes.

Recurrent DropConnect needs nothing here: the layer hands over the masked recurrent kernel.
It runs the plain LSTM too (so every test that runs each kernel checks it), but the dispatch
gives plain problems to fused_cpp, whose binding adds the routes only the plain cell has (a tiny
batch's single step, the fused-input inference) and the input projection in C++. Traces come from
the forward's buffers (the activated gates it saves anyway, plus each step's h and C), detached.

Per-row lengths (`Recurrence.lengths`, or a right-padded mask) and resets: packed as fused_cpp runs
them (packing.py), but for zoneout (its draws are numbered by the unpacked step and row) and traces.

bfloat16/float16 (problem.py, Recurrence: "Precision"): the float32 recurrence on operands rounded
to the low precision, h rounded at every step in C++ (`fused.RoundedOperandsOp`).

Autograd, torch.compile and torch.export: `fused.FusedOp` (the custom ops are
lstm::fused_variants_forward / lstm::fused_variants_backward). The zoneout seed is one of the
tensors without gradient there: a 0-dim int64 tensor drawn when the graph runs
(layers.rng.counter_seed), an int in eager calls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fused, native, packing, support
from .input_projection import bias_with_forget_bias, input_projection_backward
from .problem import Recurrence, RecurrenceResult, answers_empty_sequences
from .reference import masked_product, unrounded

name = "fused_variants"
takes_lengths = True
takes_resets = True  # (packed: packing.py)

SAVED_COUNT = 11  # G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, xk, rstd_x, mean_x


def supports(p: Recurrence) -> bool:
    return (p.cell.kind == "lstm" and support.activation_codes(p.cell) is not None
            and (support.on_cpu_in_one_float_dtype(p) or support.on_cpu_in_low_precision(p, dropout=True))
            and (p.reset is None or packing.can_pack(p, packable=not p.trace and p.zoneout is None))
            and support.extension_ready())


class Options(NamedTuple):
    """The C++ forward's and backward's options, in their order (the zoneout thresholds are those
    of `Zoneout.threshold`, 0: no zoneout; cell_clip -1: none)."""

    zoneout_offset: int
    zoneout_keep_h: int
    zoneout_keep_c: int
    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    coupled: bool
    activation: int
    recurrent_activation: int
    cell_clip: float
    trace: bool


def _project(x: torch.Tensor, kernel: torch.Tensor, in_drop, gates: int, low=None) -> torch.Tensor:
    """xk = x @ kernel [B, T, G*U], contiguous; in bfloat16/float16 (`low`) x after its dropout
    masks rounded to it, as the reference kernel rounds a product's operand."""
    if in_drop is not None and low is not None:
        return masked_product(x, kernel, in_drop[:, :, None, :], gates, lambda t: t.to(low).float()).contiguous()
    if in_drop is None:  # one 2-D GEMM, as matmul does with grad (a strided x would take another route)
        B, T, D = x.shape
        xk = native.module.pooled_empty([B * T, kernel.shape[1]], x)
        return torch.mm(x.reshape(B * T, D), kernel, out=xk).view(B, T, kernel.shape[1])
    return masked_product(x, kernel, in_drop[:, :, None, :], gates).contiguous()


class VariantsOp(fused.RoundedOperandsOp):
    """The inputs of a variant that is off are None; forward -> Y, hT, cT, then the SAVED_COUNT
    buffers (with save or trace), then with trace each step's h and C."""

    name = "fused_variants"
    input_names = ("x", "kernel", "gate_gain", "bias", "recurrent_kernel", "peephole", "cell_gain", "cell_shift",
                   "projection", "h0", "c0")
    # packed (batch_sizes given): x [N, 1, D], input_dropout per packed row [G, N, D], recurrent_dropout
    # per running row [G, B, U] (the C++ steps read it; the product for dR expands it)
    fixed_names = ("input_dropout", "recurrent_dropout", "mask", "zoneout_seed", "batch_sizes")
    output_count = 3
    Options = Options
    overwrites_saved = True  # G, or with layer norm xk and LN(A)

    def float32_forward(self, inputs, fixed, options, save, low):
        x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P, h0, c0 = inputs
        in_drop, rd, mask, seed, batch_sizes = fixed
        xk = _project(x, kernel, in_drop, 3 if options.coupled else 4, low)
        results = native.module.variant_forward(
            xk, gate_gain, bias, R, rd, peephole, gain_c, shift_c, P, int(seed), *options[:3], mask, batch_sizes, h0, c0,
            *options[3:10], save, options.trace, fused.OPERAND_CODES.get(low, 0))
        return results + [None] * (3 + SAVED_COUNT + 2 - len(results))

    def float32_backward(self, output_grads, inputs, saved, fixed, options, needs, overwrite, low):
        x, kernel, gate_gain, bias, R, peephole, gain_c, shift_c, P = inputs[:9]
        in_drop, rd, mask, seed, batch_sizes = fixed
        saved = [R.new_empty(0) if t is None else t for t in saved[:SAVED_COUNT]]
        grads = native.module.variant_backward(*output_grads, saved, gate_gain, bias, R, rd, peephole, gain_c,
                                               shift_c, P, int(seed), *options[:3], mask, batch_sizes,
                                               *options[3:10], overwrite)
        dxk, dA, dr, dh0, dc0, d_peephole, d_gain_c, d_shift_c, d_gate_gain, d_bias = grads
        Hp, Hu = saved[1], saved[7]
        Ps, GU = R.shape
        U = GU // (3 if options.coupled else 4)
        dx, dkernel = input_projection_backward(x, kernel, in_drop, dxk, needs[0], needs[1],
                                                (lambda t: t.to(low).float()) if low is not None else unrounded)
        dA = dxk if dA is None else dA
        if rd is None:
            dR = Hp.reshape(-1, Ps).T @ dA.reshape(-1, GU)
        else:  # one keep-mask per gate on h_{t-1}
            if batch_sizes is not None:
                rd = rd.index_select(1, packing.ranks(batch_sizes, rd.device))
            dR = torch.cat([(Hp * rd[g][:, None, :]).reshape(-1, Ps).T @ dA[..., g * U:(g + 1) * U].reshape(-1, U)
                            for g in range(rd.shape[0])], dim=1)
        dP = None if P is None else Hu.reshape(-1, U).T @ dr.reshape(-1, Ps)
        return dx, dkernel, d_gate_gain, d_bias, dR, d_peephole, d_gain_c, d_shift_c, dP, dh0, dc0

    def forward_shapes(self, inputs, fixed, options, save):
        x, gate_gain, R, P, h0 = inputs[0], inputs[2], inputs[4], inputs[8], inputs[9]
        (B, T, _), batch = x.shape, h0.shape[0]  # (packed: x [N, 1, D])
        Ps, GU = R.shape
        U = GU // (3 if options.coupled else 4)
        ln, proj, save = gate_gain is not None, P is not None, save or options.trace

        def shape(*dims, on=True):
            return dims if on and save else (0,)

        saved = [shape(B, T, GU), shape(B, T, Ps), shape(B, T, U), shape(B, T, GU, on=ln), shape(B, T, on=ln),
                 shape(B, T, on=ln), shape(B, T, on=ln), shape(B, T, U, on=proj), shape(B, T, GU, on=ln),
                 shape(B, T, on=ln), shape(B, T, on=ln)]
        trace = [(B, T, Ps), (B, T, U)] if options.trace else [(0,), (0,)]
        return [(B, T, Ps) if options.return_sequences else (batch, Ps), (batch, Ps), (batch, U), *saved, *trace]


OP = VariantsOp()


def _trace(p: Recurrence, G: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> dict:
    """The reference's trace from the forward's buffers (G is in time order), detached."""
    G, H, C = G.detach(), H.detach(), C.detach()
    gates = dict(zip(p.cell.gate_names, G.split(p.units, dim=-1)))
    if p.go_backwards:
        gates = {name: gate.flip(1) for name, gate in gates.items()}
    f = gates["f"]
    return {"i": gates["i"] if "i" in gates else 1 - f, "f": f, "c_tilde": gates["c"], "c": C, "o": gates["o"], "h": H}


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    p, lengths = packing.route(p, packable=not p.trace and p.zoneout is None)
    cell, zoneout = p.cell, p.zoneout
    seed = 0 if zoneout is None else zoneout.seed  # (a tensor under torch.compile: rng.counter_seed)
    if torch.compiler.is_compiling():
        seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
    elif isinstance(seed, torch.Tensor):
        seed = int(seed)
    thresholds = (0, 0) if zoneout is None else (zoneout.threshold(zoneout.rate_h), zoneout.threshold(zoneout.rate_c))
    options = Options(0 if zoneout is None else zoneout.offset, *thresholds, bool(p.go_backwards),
                      bool(p.zero_output_for_mask), bool(p.return_sequences), bool(cell.coupled),
                      *support.activation_codes(cell), -1.0 if cell.cell_clip is None else float(cell.cell_clip),
                      bool(p.trace))
    gate_gain, gain_c, shift_c = p.layer_norm or (None, None, None)
    weights = (p.kernel, gate_gain, bias_with_forget_bias(p), p.recurrent_kernel, p.peephole, gain_c, shift_c,
               p.projection)
    if lengths is not None:
        return _run_packed(p, lengths, weights, options)
    fixed = (p.input_dropout, p.recurrent_dropout, p.mask, seed, None)
    (y, hT, cT), saved = OP.call((p.inputs, *weights, *p.initial_state), fixed, options, keep_saved=p.trace)
    trace = _trace(p, saved[0], *saved[SAVED_COUNT:]) if p.trace else None
    return RecurrenceResult(y, (hT, cT), trace)


def _run_packed(p: Recurrence, lengths: torch.Tensor, weights: tuple, options: Options) -> RecurrenceResult:
    """The call on the rows' valid steps only (packing.py; no zoneout)."""
    options = options._replace(go_backwards=False, zero_output_for_mask=False)

    def call(x, states, input_dropout, recurrent_dropout, batch_sizes):
        fixed = (input_dropout, recurrent_dropout, None, 0, batch_sizes)
        return OP.call((x, *weights, *states), fixed, options)[0]

    return packing.run_packed(p, lengths, call)
