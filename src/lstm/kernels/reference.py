"""The reference kernel: the tutorial's equations, one step at a time, autograd for BPTT.

This is the ground truth every fused kernel is tested against. It reads like the tutorial:

    f_t = σ(W_f [h_{t-1}, x_t] + b_f)        forget gate
    i_t = σ(W_i [h_{t-1}, x_t] + b_i)        input gate
    C̃_t = tanh(W_C [h_{t-1}, x_t] + b_C)     candidate cell state
    C_t = f_t * C_{t-1} + i_t * C̃_t          new cell state
    o_t = σ(W_o [h_{t-1}, x_t] + b_o)        output gate
    h_t = o_t * tanh(C_t)                    output

with Keras' weights: W = [kernel; recurrent_kernel] split into blocks i | f | c | o, σ the
`recurrent_activation` and tanh the `activation`. Masking follows Keras (SPEC.md §6): a
masked step keeps the state and repeats the previous output (or outputs zeros). A reset before a
step that counts sets the state to the restored one first.

The LSTM variants (CellSpec flags), each written from its paper:
    peephole      z_i += p_i * C_{t-1}, z_f += p_f * C_{t-1}, z_o += p_o * C_t   (Gers & Schmidhuber 2000)
    layer_norm    z = LN(x W) g_x + LN(h U) g_h + b; h_t = o_t * tanh(LN(C_t) g_c + b_c)   (Ba et al. 2016,
                  haste's LayerNormLSTM; LN without its own shift on the gates, the bias is that shift)
    proj_size     h_t = (o_t * tanh(C_t)) @ P, and h_t is what the recurrence sees   (Sak et al. 2014)
    coupled       i_t = 1 - f_t   (CIFG)
    forget_bias   z_f += forget_bias   (TF1's LSTMCell)
    cell_clip     C_t = clip(C_t, -cell_clip, cell_clip)
    zoneout       h_t = h_{t-1} where keep_h else h_t; C_t likewise   (Krueger et al. 2016)

Precision (Recurrence's rules): float32 and float64 compute in their dtype. bfloat16 and float16
compute in float32 on rounded operands: every product's operands (x, h, the weights, a
projection's input) are rounded to the low precision and multiplied in float32, where products of
two bfloat16 (float16) numbers are exact, so a product is the low-precision product with float32
accumulation; the gates and C stay float32; h is rounded at every step. The rounding passes
gradients through unrounded (the weights' gradients are summed in float32). The maths runs with
torch.autocast off, so these numbers hold in any autocast region.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Optional

import torch

from .. import activations
from .problem import (LOW_PRECISION, TRACE_KEYS, QuantizedMatrix, Recurrence, RecurrenceResult,
                      answers_empty_sequences, final_states, quantized_product)

name = "reference"
takes_lengths = True  # (as their mask: `Recurrence.masked`)
takes_resets = True
takes_quantized = True

Rounding = Callable[[torch.Tensor], torch.Tensor]


def supports(problem: Recurrence) -> bool:
    return True


def unrounded(t: torch.Tensor) -> torch.Tensor:
    return t


class _RoundedTo(torch.autograd.Function):
    """t's values rounded to a lower precision, kept in t's dtype; the gradient passes unrounded."""

    @staticmethod
    def forward(ctx, t, dtype):
        return t.to(dtype).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def product(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight, or `quantized_product` for an int8 weight (a `QuantizedMatrix`)."""
    return quantized_product(x, weight) if isinstance(weight, QuantizedMatrix) else x @ weight


def masked_product(x: torch.Tensor, weight, masks: Optional[torch.Tensor], gates: int,
                   rounded: Rounding = unrounded) -> torch.Tensor:
    """x @ weight, with dropout keep-masks applied to x (shared by all gates, or one per gate),
    then x rounded for a low-precision product (`weight` comes rounded); the fused variants kernel
    projects its inputs with it too."""
    if masks is None:
        return product(rounded(x), weight)
    if masks.shape[0] == 1:
        return product(rounded(x * masks[0]), weight)
    blocks = weight.chunk(gates, dim=-1) if isinstance(weight, torch.Tensor) else weight.chunk(gates)
    return torch.cat([product(rounded(x * masks[g]), blocks[g]) for g in range(len(blocks))], dim=-1)


LAYER_NORM_EPS = 1e-5  # haste's


def layer_norm(z: torch.Tensor) -> torch.Tensor:
    """Normalised over the last dimension, without gain or shift."""
    return torch.nn.functional.layer_norm(z, z.shape[-1:], eps=LAYER_NORM_EPS)


def _input_projection(p: Recurrence, x: torch.Tensor, rounded: Rounding) -> torch.Tensor:
    """x_t @ kernel (+ input bias) for every step at once: [B, T, G*U]."""
    masks = None if p.input_dropout is None else p.input_dropout[:, :, None, :]
    kernel = p.kernel if p.quantized is None else p.quantized[0]
    xw = masked_product(x, kernel, masks, p.cell.gate_count, rounded)
    if p.cell.layer_norm:
        xw = layer_norm(xw) * p.layer_norm[0][0]
    if p.bias is not None:
        xw = xw + (p.bias[0] if p.bias.dim() == 2 else p.bias)
    return xw


def lstm_step(xw_t, state, p: Recurrence, σ, tanh, rounded: Rounding, keep_h=None, keep_c=None):
    cell = p.cell
    h_prev, C_prev = state
    recurrent_kernel = p.recurrent_kernel if p.quantized is None else p.quantized[1]
    hU = masked_product(h_prev, recurrent_kernel, p.recurrent_dropout, cell.gate_count, rounded)
    if cell.layer_norm:
        hU = layer_norm(hU) * p.layer_norm[0][1]
    z = dict(zip(cell.gate_names, (xw_t + hU).chunk(cell.gate_count, dim=-1)))
    z["f"] = z["f"] + cell.forget_bias
    peephole = dict(zip(cell.peephole_gates, p.peephole)) if cell.peephole else {}
    if cell.peephole:
        z["f"] = z["f"] + peephole["f"] * C_prev
        if not cell.coupled:
            z["i"] = z["i"] + peephole["i"] * C_prev
    f_t = σ(z["f"])
    i_t = 1 - f_t if cell.coupled else σ(z["i"])
    C_tilde = tanh(z["c"])
    C_t = f_t * C_prev + i_t * C_tilde
    if cell.cell_clip is not None:
        C_t = C_t.clamp(-cell.cell_clip, cell.cell_clip)
    o_t = σ(z["o"] + peephole["o"] * C_t if cell.peephole else z["o"])
    if cell.layer_norm:
        _, cell_gain, cell_shift = p.layer_norm
        h_t = o_t * tanh(layer_norm(C_t) * cell_gain + cell_shift)
    else:
        h_t = o_t * tanh(C_t)
    if p.projection is not None:
        h_t = rounded(h_t) @ p.projection
    h_t = rounded(h_t)
    if keep_h is not None:
        h_t = torch.where(keep_h, h_prev, h_t)
    if keep_c is not None:
        C_t = torch.where(keep_c, C_prev, C_t)
    return h_t, (h_t, C_t), {"i": i_t, "f": f_t, "c_tilde": C_tilde, "c": C_t, "o": o_t, "h": h_t}


def gru_step(xw_t, state, p: Recurrence, σ, tanh, rounded: Rounding):
    (h_prev,) = state
    U = p.units
    x_z, x_r, x_h = xw_t.chunk(3, dim=-1)
    masks = p.recurrent_dropout
    if p.cell.reset_after:
        hr = masked_product(h_prev, p.recurrent_kernel, masks, 3, rounded)
        if p.bias is not None:
            hr = hr + p.bias[1]
        h_z, h_r, h_h = hr.chunk(3, dim=-1)
        z_t = σ(x_z + h_z)
        r_t = σ(x_r + h_r)
        h_tilde = tanh(x_h + r_t * h_h)
    else:
        hr = masked_product(h_prev, p.recurrent_kernel[:, : 2 * U], None if masks is None else masks[:2], 2, rounded)
        h_z, h_r = hr.chunk(2, dim=-1)
        z_t = σ(x_z + h_z)
        r_t = σ(x_r + h_r)
        h_for_candidate = h_prev if masks is None else h_prev * masks[2]
        h_tilde = tanh(x_h + rounded(r_t * h_for_candidate) @ p.recurrent_kernel[:, 2 * U :])
    h_t = rounded(z_t * h_prev + (1 - z_t) * h_tilde)
    return h_t, (h_t,), {"z": z_t, "r": r_t, "h_tilde": h_tilde, "h": h_t}


def simple_rnn_step(xw_t, state, p: Recurrence, σ, tanh, rounded: Rounding):
    (h_prev,) = state
    h_t = rounded(tanh(xw_t + masked_product(h_prev, p.recurrent_kernel, p.recurrent_dropout, 1, rounded)))
    return h_t, (h_t,), {"h": h_t}


_STEPS = {"lstm": lstm_step, "gru": gru_step, "simple_rnn": simple_rnn_step}


@answers_empty_sequences
def run(p: Recurrence) -> RecurrenceResult:
    p = p.masked()  # (every step's inputs reach a product: those that do not count as zeros)
    with autocast_off(p.inputs.device.type):
        if p.compute_dtype in LOW_PRECISION:
            return _run_low_precision(p)
        return _run(p, unrounded)


def autocast_off(device_type: str):
    """Autocast would recast the products (and round their results); a kernel's casts are explicit."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _run_low_precision(p: Recurrence) -> RecurrenceResult:
    """The recurrence in float32 on operands rounded to the compute dtype (see the module docstring)."""
    compute = p.compute_dtype

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return _RoundedTo.apply(t, compute)

    def f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.float()

    h0, *other_states = p.initial_state
    in_float32 = replace(
        p, inputs=f32(p.inputs), kernel=rounded(f32(p.kernel)), recurrent_kernel=rounded(f32(p.recurrent_kernel)),
        bias=f32(p.bias), initial_state=(rounded(f32(h0)), *map(f32, other_states)),
        reset_state=None if p.reset_state is None else (rounded(f32(p.reset_state[0])), *map(f32, p.reset_state[1:])),
        input_dropout=f32(p.input_dropout), recurrent_dropout=f32(p.recurrent_dropout), peephole=f32(p.peephole),
        layer_norm=None if p.layer_norm is None else tuple(map(f32, p.layer_norm)),
        projection=None if p.projection is None else rounded(f32(p.projection)))
    result = _run(in_float32, rounded)
    return RecurrenceResult(result.outputs.to(compute), final_states(p, result.states), result.trace)


def _run(p: Recurrence, rounded: Rounding) -> RecurrenceResult:
    step = _STEPS[p.cell.kind]
    σ = activations.get(p.cell.recurrent_activation)
    tanh = activations.get(p.cell.activation)
    x, mask, reset = p.inputs, p.step_mask(), p.reset
    if reset is not None:
        reset = reset if mask is None else reset & mask
        restored = p.restored_states()
    if p.go_backwards:
        x = x.flip(1)
        mask = None if mask is None else mask.flip(1)
        reset = None if reset is None else reset.flip(1)
    batch, steps = x.shape[0], x.shape[1]
    xw = _input_projection(p, x, rounded)

    state = tuple(p.initial_state)
    zeros = torch.zeros(batch, p.output_size, dtype=x.dtype, device=x.device)
    previous_output = zeros
    outputs, traces = [], []
    zoneout = {}
    if p.zoneout is not None:
        masks = (p.zoneout.mask(k, batch, steps, size, x.device) for k, size in enumerate((p.output_size, p.units)))
        zoneout = {name: keep for name, keep in zip(("keep_h", "keep_c"), masks) if keep is not None}
    for t in range(steps):
        if reset is not None:
            starts = reset[:, t, None]
            state = tuple(torch.where(starts, new, old) for new, old in zip(restored, state))
        output, new_state, internals = step(xw[:, t], state, p, σ, tanh, rounded,
                                            **{name: keep[:, t] for name, keep in zoneout.items()})
        if mask is not None:
            keep = mask[:, t, None]
            new_state = tuple(torch.where(keep, new, old) for new, old in zip(new_state, state))
            output = torch.where(keep, output, zeros if p.zero_output_for_mask else previous_output)
        state, previous_output = new_state, output
        outputs.append(output)
        if p.trace:
            traces.append(internals)

    out = torch.stack(outputs, dim=1) if p.return_sequences else outputs[-1]
    trace = {k: torch.stack([tr[k] for tr in traces], dim=1) for k in TRACE_KEYS[p.cell.kind]} if p.trace else None
    return RecurrenceResult(out, state, trace)
