"""The Triton programs of triton_lstm.py: one LSTM step's gate maths, forward and hand-derived
backward, for a tile of rows x units. The products (x @ kernel, h @ recurrent_kernel) are
torch's GEMMs around them; this module imports triton, which triton_lstm.py loads on first use.

Buffers (time-major, processing order s; G = 3 coupled else 4 gate blocks of U columns):
    z      [T, B, G*U]  the pre-activations x_t W + b + h_{s-1} U, overwritten by the activated
                        gates (forward), then by their pre-activation gradients dz (backward)
    h, c   [T+1, B, U]  the states before step s at index s (h[0], c[0]: the initial states)
    y      [T, B, U]    the outputs
    mask   bool [B, T]  in time order (go_backwards reads index T-1-s)
    keep_h, keep_c      bool [B, T, U] zoneout's keep-masks, in processing order
    peephole            [G-1, U] the rows i, f, o (f, o coupled)
    clip                [1]  cell_clip in the compute dtype (a float argument would be float32)
Activation codes are native.ACTIVATION_CODES'; derivatives come from the activated values.
"""

from __future__ import annotations

import triton
import triton.language as tl

TANH, SIGMOID, RELU, LINEAR, HARD_SIGMOID, HARD_SIGMOID_TF_KERAS = range(6)


@triton.jit
def _activation(z, CODE: tl.constexpr):
    if CODE == TANH:
        # (1 - e)/(1 + e) with e = exp(-2|z|) <= 1: no overflow for any z
        e = tl.exp(-2.0 * tl.abs(z))
        magnitude = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -magnitude, magnitude)
    elif CODE == SIGMOID:
        e = tl.exp(-tl.abs(z))  # (<= 1: no overflow)
        return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif CODE == RELU:
        return tl.maximum(z, 0.0)
    elif CODE == LINEAR:
        return z
    elif CODE == HARD_SIGMOID:
        return tl.minimum(tl.maximum(z / 6.0 + 0.5, 0.0), 1.0)
    else:
        return tl.minimum(tl.maximum(0.2 * z + 0.5, 0.0), 1.0)


@triton.jit
def _derivative(a, CODE: tl.constexpr):
    """d activation / dz at the activated value a (as torch's backward formulas take it)."""
    if CODE == TANH:
        return 1.0 - a * a
    elif CODE == SIGMOID:
        return a * (1.0 - a)
    elif CODE == RELU:
        return tl.where(a > 0, 1.0, 0.0)
    elif CODE == LINEAR:
        return tl.full(a.shape, 1.0, a.dtype)
    elif CODE == HARD_SIGMOID:
        return tl.where((a > 0) & (a < 1), 1.0, 0.0).to(a.dtype) / 6.0  # (a float64 1/6, not a float32 one)
    else:
        return tl.where((a > 0) & (a < 1), 1.0, 0.0).to(a.dtype) * 0.2


@triton.jit
def _rounded(h, ROUND_H: tl.constexpr):
    """float32 h rounded to the compute dtype of a bfloat16 (1) / float16 (2) call, held in float32.
    bfloat16 by hand, to nearest even on the bits: Triton's interpreter converts by truncation."""
    if ROUND_H == 1:
        bits = h.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif ROUND_H == 2:
        return h.to(tl.float16).to(tl.float32)
    else:
        return h


@triton.jit
def lstm_forward_step(z_ptr, h_ptr, c_ptr, y_ptr, mask_ptr, keep_h_ptr, keep_c_ptr, peephole_ptr,
                      s, t, B, U, T, clip_ptr,
                      COUPLED: tl.constexpr, ACTIVATION: tl.constexpr, RECURRENT_ACTIVATION: tl.constexpr,
                      HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr, HAS_KEEP_C: tl.constexpr,
                      HAS_PEEPHOLE: tl.constexpr, HAS_CLIP: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                      ROUND_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s (time index t): z[s] -> gates (in place), h[s+1], c[s+1], y[s]."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)[None, :]
    inside = (rows < B) & (units < U)
    G: tl.constexpr = 3 if COUPLED else 4
    z = z_ptr + s * B * G * U + rows * G * U + units
    state = rows * U + units
    h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
    c_prev = tl.load(c_ptr + s * B * U + state, mask=inside, other=0.0)

    if COUPLED:
        z_f = tl.load(z, mask=inside, other=0.0)
        z_c = tl.load(z + U, mask=inside, other=0.0)
        z_o = tl.load(z + 2 * U, mask=inside, other=0.0)
        if HAS_PEEPHOLE:
            p_f = tl.load(peephole_ptr + units, mask=units < U, other=0.0)
            p_o = tl.load(peephole_ptr + U + units, mask=units < U, other=0.0)
            z_f += p_f * c_prev
        f = _activation(z_f, RECURRENT_ACTIVATION)
        i = 1.0 - f
    else:
        z_i = tl.load(z, mask=inside, other=0.0)
        z_f = tl.load(z + U, mask=inside, other=0.0)
        z_c = tl.load(z + 2 * U, mask=inside, other=0.0)
        z_o = tl.load(z + 3 * U, mask=inside, other=0.0)
        if HAS_PEEPHOLE:
            p_i = tl.load(peephole_ptr + units, mask=units < U, other=0.0)
            p_f = tl.load(peephole_ptr + U + units, mask=units < U, other=0.0)
            p_o = tl.load(peephole_ptr + 2 * U + units, mask=units < U, other=0.0)
            z_i += p_i * c_prev
            z_f += p_f * c_prev
        i = _activation(z_i, RECURRENT_ACTIVATION)
        f = _activation(z_f, RECURRENT_ACTIVATION)
    c_tilde = _activation(z_c, ACTIVATION)
    c_new = f * c_prev + i * c_tilde
    if HAS_CLIP:
        cell_clip = tl.load(clip_ptr)
        c_new = tl.minimum(tl.maximum(c_new, -cell_clip), cell_clip)
    if HAS_PEEPHOLE:
        z_o += p_o * c_new
    o = _activation(z_o, RECURRENT_ACTIVATION)
    h_new = _rounded(o * _activation(c_new, ACTIVATION), ROUND_H)

    if COUPLED:
        tl.store(z, f, mask=inside)
        tl.store(z + U, c_tilde, mask=inside)
        tl.store(z + 2 * U, o, mask=inside)
    else:
        tl.store(z, i, mask=inside)
        tl.store(z + U, f, mask=inside)
        tl.store(z + 2 * U, c_tilde, mask=inside)
        tl.store(z + 3 * U, o, mask=inside)

    if HAS_KEEP_H:
        keep = tl.load(keep_h_ptr + rows * T * U + s * U + units, mask=inside, other=0) != 0
        h_new = tl.where(keep, h_prev, h_new)
    if HAS_KEEP_C:
        keep = tl.load(keep_c_ptr + rows * T * U + s * U + units, mask=inside, other=0) != 0
        c_new = tl.where(keep, c_prev, c_new)
    output = h_new
    if HAS_MASK:
        counts = tl.load(mask_ptr + rows * T + t, mask=rows < B, other=0) != 0
        h_new = tl.where(counts, h_new, h_prev)
        c_new = tl.where(counts, c_new, c_prev)
        if ZERO_OUTPUT:
            output = tl.where(counts, output, 0.0)
        else:
            # Keras: the previous output (zeros before the first step)
            y_prev = tl.load(y_ptr + tl.maximum(s - 1, 0) * B * U + state, mask=inside, other=0.0)
            output = tl.where(counts, output, tl.where(s > 0, y_prev, 0.0))
    tl.store(h_ptr + (s + 1) * B * U + state, h_new, mask=inside)
    tl.store(c_ptr + (s + 1) * B * U + state, c_new, mask=inside)
    tl.store(y_ptr + s * B * U + state, output, mask=inside)


@triton.jit
def lstm_backward_step(z_ptr, c_ptr, dy_ptr, dh_ptr, dc_ptr, carry_ptr, mask_ptr, keep_h_ptr, keep_c_ptr,
                       peephole_ptr, dpeephole_ptr,
                       s, t, B, U, T, clip_ptr, dy_stride_s, dy_stride_b,
                       COUPLED: tl.constexpr, ACTIVATION: tl.constexpr, RECURRENT_ACTIVATION: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr, HAS_KEEP_C: tl.constexpr,
                       HAS_PEEPHOLE: tl.constexpr, HAS_CLIP: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                       HAS_DY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s backwards: the activated gates z[s] -> dz[s] (in place); dh (the gradient of h[s+1])
    becomes the part of h[s]'s that bypasses the product h[s] @ U (the caller adds dz[s] @ U^T), dc
    (of c[s+1]) becomes c[s]'s; carry holds the gradient of the previous output (a masked step's
    output is it); dpeephole [G-1, B, U] accumulates the peepholes' gradients per row."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)[None, :]
    inside = (rows < B) & (units < U)
    G: tl.constexpr = 3 if COUPLED else 4
    z = z_ptr + s * B * G * U + rows * G * U + units
    state = rows * U + units
    dh_next = tl.load(dh_ptr + state, mask=inside, other=0.0)
    dc_next = tl.load(dc_ptr + state, mask=inside, other=0.0)
    d_output = tl.load(carry_ptr + state, mask=inside, other=0.0)
    if HAS_DY:
        d_output += tl.load(dy_ptr + s * dy_stride_s + rows * dy_stride_b + units, mask=inside, other=0.0)
    c_prev = tl.load(c_ptr + s * B * U + state, mask=inside, other=0.0)
    counts = tl.full((BLOCK_B, BLOCK_U), 1, tl.int1)
    if HAS_MASK:
        counts = (tl.load(mask_ptr + rows * T + t, mask=rows < B, other=0) != 0) & counts
    dh_out = tl.where(counts, dh_next + d_output, 0.0)  # (a masked step's h is h[s]'s: passed below)
    if ZERO_OUTPUT:
        carry = tl.zeros((BLOCK_B, BLOCK_U), d_output.dtype)
    else:
        carry = tl.where(counts, 0.0, d_output)
    dc_new = tl.where(counts, dc_next, 0.0)
    dh_pass = tl.where(counts, 0.0, dh_next)
    dc_pass = tl.where(counts, 0.0, dc_next)
    if HAS_KEEP_H:
        keep = tl.load(keep_h_ptr + rows * T * U + s * U + units, mask=inside, other=0) != 0
        dh_pass += tl.where(keep, dh_out, 0.0)
        dh_out = tl.where(keep, 0.0, dh_out)
    if HAS_KEEP_C:
        keep = tl.load(keep_c_ptr + rows * T * U + s * U + units, mask=inside, other=0) != 0
        dc_pass += tl.where(keep, dc_new, 0.0)
        dc_new = tl.where(keep, 0.0, dc_new)

    if COUPLED:
        f = tl.load(z, mask=inside, other=0.0)
        c_tilde = tl.load(z + U, mask=inside, other=0.0)
        o = tl.load(z + 2 * U, mask=inside, other=0.0)
        i = 1.0 - f
    else:
        i = tl.load(z, mask=inside, other=0.0)
        f = tl.load(z + U, mask=inside, other=0.0)
        c_tilde = tl.load(z + 2 * U, mask=inside, other=0.0)
        o = tl.load(z + 3 * U, mask=inside, other=0.0)
    c_raw = f * c_prev + i * c_tilde
    c_new = c_raw
    if HAS_CLIP:
        cell_clip = tl.load(clip_ptr)
        c_new = tl.minimum(tl.maximum(c_raw, -cell_clip), cell_clip)
    cell_output = _activation(c_new, ACTIVATION)
    dz_o = dh_out * cell_output * _derivative(o, RECURRENT_ACTIVATION)
    dc = dc_new + dh_out * o * _derivative(cell_output, ACTIVATION)
    if HAS_PEEPHOLE:
        p_o = tl.load(peephole_ptr + (G - 2) * U + units, mask=units < U, other=0.0)
        dc += dz_o * p_o
    if HAS_CLIP:
        dc = tl.where((c_raw >= -cell_clip) & (c_raw <= cell_clip), dc, 0.0)
    di = dc * c_tilde
    df = dc * c_prev
    dz_c = dc * i * _derivative(c_tilde, ACTIVATION)
    dc_prev = dc_pass + dc * f
    if COUPLED:
        dz_f = (df - di) * _derivative(f, RECURRENT_ACTIVATION)
    else:
        dz_i = di * _derivative(i, RECURRENT_ACTIVATION)
        dz_f = df * _derivative(f, RECURRENT_ACTIVATION)
    if HAS_PEEPHOLE:
        p_f = tl.load(peephole_ptr + (G - 3) * U + units, mask=units < U, other=0.0)
        dc_prev += dz_f * p_f
        d_f = dpeephole_ptr + (G - 3) * B * U + state
        tl.store(d_f, tl.load(d_f, mask=inside, other=0.0) + dz_f * c_prev, mask=inside)
        d_o = dpeephole_ptr + (G - 2) * B * U + state
        tl.store(d_o, tl.load(d_o, mask=inside, other=0.0) + dz_o * c_new, mask=inside)
        if not COUPLED:
            p_i = tl.load(peephole_ptr + units, mask=units < U, other=0.0)
            dc_prev += dz_i * p_i
            d_i = dpeephole_ptr + state
            tl.store(d_i, tl.load(d_i, mask=inside, other=0.0) + dz_i * c_prev, mask=inside)

    if COUPLED:
        tl.store(z, dz_f, mask=inside)
        tl.store(z + U, dz_c, mask=inside)
        tl.store(z + 2 * U, dz_o, mask=inside)
    else:
        tl.store(z, dz_i, mask=inside)
        tl.store(z + U, dz_f, mask=inside)
        tl.store(z + 2 * U, dz_c, mask=inside)
        tl.store(z + 3 * U, dz_o, mask=inside)
    tl.store(dh_ptr + state, dh_pass, mask=inside)
    tl.store(dc_ptr + state, dc_prev, mask=inside)
    tl.store(carry_ptr + state, carry, mask=inside)


def blocks(batch: int, units: int) -> tuple:
    """(BLOCK_B, BLOCK_U) and the grid of a step's programs."""
    block_b = min(triton.next_power_of_2(batch), 16)
    block_u = min(triton.next_power_of_2(units), 64)
    return block_b, block_u, (triton.cdiv(batch, block_b), triton.cdiv(units, block_u))
