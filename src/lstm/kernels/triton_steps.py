"""The Triton programs of triton_lstm.py: one LSTM step's gate maths, forward and hand-derived
backward, for a tile of rows x units. The products (x @ kernel, h @ recurrent_kernel, the
projection) are torch's GEMMs around them; this module imports triton, which triton_lstm.py loads
on first use.

Buffers (time-major, processing order s; G = 3 coupled else 4 gate blocks of U columns; N = the
size of h: U, or P with a projection):
    z      [T, B, G*U]  the pre-activations x_t W + b (+ h_{s-1} U without layer norm), overwritten
                        by the activated gates (forward), then by their pre-activations' gradients
    a      [T, B, G*U]  layer norm only: h_{s-1} U, overwritten by its normalised value (forward),
                        then by its gradient (backward); rstd_h [T, B] its rows' 1/std
    h      [T+1, B, N]  the states before step s at index s (h[0], c[0]: the initial states)
    c      [T+1, B, U]
    m      [T, B, U]    projection only: o * act(C), which the projection turns into h
    y      [T, B, N]    the outputs
    mask   bool [B, T]  in time order (go_backwards reads index T-1-s)
    keep_h, keep_c      bool [B, T, N] / [B, T, U] zoneout's keep-masks, in processing order
    peephole            [G-1, U] the rows i, f, o (f, o coupled)
    gate_gain           [2, G*U] layer norm's gains of x W and h U; cell_gain, cell_shift [U]
    clip                [1]  cell_clip in the compute dtype (a float argument would be float32)
Activation codes are native.ACTIVATION_CODES'; derivatives come from the activated values.
With layer norm a program holds whole rows (its reductions run over them: `blocks`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# (globals a program reads must be tl.constexpr instances: the GPU compiler refuses others)
TANH, SIGMOID, RELU, LINEAR, HARD_SIGMOID, HARD_SIGMOID_TF_KERAS = (tl.constexpr(code) for code in range(6))


@triton.jit
def activation(z, CODE: tl.constexpr):
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
def derivative(a, CODE: tl.constexpr):
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
def rounded(h, ROUND_H: tl.constexpr):
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


LAYER_NORM_EPS = tl.constexpr(1e-5)  # reference.LAYER_NORM_EPS


@triton.jit
def _row_mean(v, inside, size):
    """The mean of each row's `size` valid entries, as a [rows, 1] column."""
    return (tl.sum(tl.where(inside, v, 0.0), axis=1) / size)[:, None]


@triton.jit
def tile(B, N, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """(rows [BLOCK_B, 1], columns [1, BLOCK_U], inside) of this program's tile of a [B, N] state;
    rows in int64, as the offsets they start (row * T * N reaches past int32 for large calls)."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None]
    columns = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)[None, :]
    return rows, columns, (rows < B) & (columns < N)


@triton.jit
def store_h_and_output(h_new, h_prev, h_ptr, y_ptr, mask_ptr, keep_h_ptr, trace_h_ptr, rows, cols, inside, s, t, B,
                       N, T, HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                       TRACE: tl.constexpr):
    """Zoneout and Keras' mask on the new h (h_prev: h[s]'s tile); stores h[s+1] and the output
    y[s]: a masked step keeps h[s] and outputs the previous output (zeros before the first step),
    or zeros with ZERO_OUTPUT. TRACE: the step's own h (after zoneout, before the mask) into
    trace_h [T, B, N], as the reference kernel's trace gives it."""
    state = rows * N + cols
    if HAS_KEEP_H:
        keep = tl.load(keep_h_ptr + rows * T * N + s * N + cols, mask=inside, other=0) != 0
        h_new = tl.where(keep, h_prev, h_new)
    if TRACE:
        tl.store(trace_h_ptr + s * B * N + state, h_new, mask=inside)
    output = h_new
    if HAS_MASK:
        counts = tl.load(mask_ptr + rows * T + t, mask=rows < B, other=0) != 0
        h_new = tl.where(counts, h_new, h_prev)
        if ZERO_OUTPUT:
            output = tl.where(counts, output, 0.0)
        else:
            # Keras: the previous output (zeros before the first step)
            y_prev = tl.load(y_ptr + tl.maximum(s - 1, 0) * B * N + state, mask=inside, other=0.0)
            output = tl.where(counts, output, tl.where(s > 0, y_prev, 0.0))
    tl.store(h_ptr + (s + 1) * B * N + state, h_new, mask=inside)
    tl.store(y_ptr + s * B * N + state, output, mask=inside)


@triton.jit
def h_gradient(dh_ptr, dy_ptr, carry_ptr, mask_ptr, keep_h_ptr, rows, cols, inside, s, t, B, N, T,
               dy_stride_s, dy_stride_b, HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr,
               ZERO_OUTPUT: tl.constexpr, HAS_DY: tl.constexpr):
    """`store_h_and_output` backwards, from the gradients of h[s+1] (dh) and y[s] (dy, plus the
    carried gradient of the previous output): (that of the step's new h; the part of h[s]'s that
    bypasses the step, through a masked step or zoneout). carry becomes the gradient of y[s-1]."""
    state = rows * N + cols
    dh_next = tl.load(dh_ptr + state, mask=inside, other=0.0)
    d_output = tl.load(carry_ptr + state, mask=inside, other=0.0)
    if HAS_DY:
        d_output += tl.load(dy_ptr + s * dy_stride_s + rows * dy_stride_b + cols, mask=inside, other=0.0)
    counts = tl.full(dh_next.shape, 1, tl.int1)
    if HAS_MASK:
        counts = (tl.load(mask_ptr + rows * T + t, mask=rows < B, other=0) != 0) & counts
    dh_new = tl.where(counts, dh_next + d_output, 0.0)
    dh_pass = tl.where(counts, 0.0, dh_next)
    if ZERO_OUTPUT:
        carry = tl.zeros(dh_next.shape, dh_next.dtype)
    else:
        carry = tl.where(counts, 0.0, d_output)
    if HAS_KEEP_H:
        keep = tl.load(keep_h_ptr + rows * T * N + s * N + cols, mask=inside, other=0) != 0
        dh_pass += tl.where(keep, dh_new, 0.0)
        dh_new = tl.where(keep, 0.0, dh_new)
    tl.store(carry_ptr + state, carry, mask=inside)
    return dh_new, dh_pass


@triton.jit
def _normalized_rows(v, inside, size):
    """((v - mean) * rstd over each row's `size` valid entries, rstd [rows, 1])."""
    centred = tl.where(inside, v - _row_mean(v, inside, size), 0.0)
    rstd = 1.0 / tl.sqrt(_row_mean(centred * centred, inside, size) + LAYER_NORM_EPS)
    return centred * rstd, rstd


@triton.jit
def _layer_norm_backward(d_normalized, normalized, rstd, inside, size):
    """The gradient of v from that of (v - mean) * rstd, given the normalised values."""
    mean_d = _row_mean(d_normalized, inside, size)
    mean_dn = _row_mean(d_normalized * normalized, inside, size)
    return rstd * (d_normalized - mean_d - normalized * mean_dn)


@triton.jit
def lstm_forward_step(z_ptr, a_ptr, rstd_h_ptr, h_ptr, c_ptr, m_ptr, y_ptr, mask_ptr, keep_h_ptr, keep_c_ptr,
                      peephole_ptr, gate_gain_ptr, cell_gain_ptr, cell_shift_ptr, clip_ptr, trace_h_ptr, trace_c_ptr,
                      s, t, B, U, T,
                      COUPLED: tl.constexpr, ACTIVATION: tl.constexpr, RECURRENT_ACTIVATION: tl.constexpr,
                      HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr, HAS_KEEP_C: tl.constexpr,
                      HAS_PEEPHOLE: tl.constexpr, HAS_CLIP: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                      LAYER_NORM: tl.constexpr, PROJECTED: tl.constexpr, ROUND_H: tl.constexpr,
                      TRACE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s (time index t): z[s] -> the gates (in place), c[s+1], and h[s+1], y[s]; projected,
    m[s] instead of h and y (`lstm_output_step` makes them from m[s] @ projection). TRACE: the
    step's own C and h (after zoneout, before the mask) into trace_c [T, B, U], trace_h [T, B, N]."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    in_row = units < U
    G: tl.constexpr = 3 if COUPLED else 4
    z = z_ptr + s * B * G * U + rows * G * U + units
    state = rows * U + units
    c_prev = tl.load(c_ptr + s * B * U + state, mask=inside, other=0.0)
    # the gate blocks: i (not coupled), f, c, o
    z_f = tl.load(z + (G - 3) * U, mask=inside, other=0.0)
    z_c = tl.load(z + (G - 2) * U, mask=inside, other=0.0)
    z_o = tl.load(z + (G - 1) * U, mask=inside, other=0.0)
    if not COUPLED:
        z_i = tl.load(z, mask=inside, other=0.0)
    if LAYER_NORM:  # z += LN(h U) * gain, over the row's G*U columns
        a = a_ptr + s * B * G * U + rows * G * U + units
        a_f = tl.load(a + (G - 3) * U, mask=inside, other=0.0)
        a_c = tl.load(a + (G - 2) * U, mask=inside, other=0.0)
        a_o = tl.load(a + (G - 1) * U, mask=inside, other=0.0)
        total = tl.sum(a_f + a_c + a_o, axis=1)
        if not COUPLED:
            a_i = tl.load(a, mask=inside, other=0.0)
            total += tl.sum(a_i, axis=1)
        mean = (total / (G * U))[:, None]
        a_f = tl.where(inside, a_f - mean, 0.0)
        a_c = tl.where(inside, a_c - mean, 0.0)
        a_o = tl.where(inside, a_o - mean, 0.0)
        squares = tl.sum(a_f * a_f + a_c * a_c + a_o * a_o, axis=1)
        if not COUPLED:
            a_i = tl.where(inside, a_i - mean, 0.0)
            squares += tl.sum(a_i * a_i, axis=1)
        rstd = (1.0 / tl.sqrt(squares / (G * U) + LAYER_NORM_EPS))[:, None]
        tl.store(rstd_h_ptr + s * B + rows, rstd, mask=rows < B)
        gain = gate_gain_ptr + G * U + units
        a_f *= rstd
        a_c *= rstd
        a_o *= rstd
        tl.store(a + (G - 3) * U, a_f, mask=inside)
        tl.store(a + (G - 2) * U, a_c, mask=inside)
        tl.store(a + (G - 1) * U, a_o, mask=inside)
        z_f += a_f * tl.load(gain + (G - 3) * U, mask=in_row, other=0.0)
        z_c += a_c * tl.load(gain + (G - 2) * U, mask=in_row, other=0.0)
        z_o += a_o * tl.load(gain + (G - 1) * U, mask=in_row, other=0.0)
        if not COUPLED:
            a_i *= rstd
            tl.store(a, a_i, mask=inside)
            z_i += a_i * tl.load(gain, mask=in_row, other=0.0)

    if HAS_PEEPHOLE:
        z_f += tl.load(peephole_ptr + (G - 3) * U + units, mask=in_row, other=0.0) * c_prev
    f = activation(z_f, RECURRENT_ACTIVATION)
    if COUPLED:
        i = 1.0 - f
    else:
        if HAS_PEEPHOLE:
            z_i += tl.load(peephole_ptr + units, mask=in_row, other=0.0) * c_prev
        i = activation(z_i, RECURRENT_ACTIVATION)
    c_tilde = activation(z_c, ACTIVATION)
    c_new = f * c_prev + i * c_tilde
    if HAS_CLIP:
        cell_clip = tl.load(clip_ptr)
        c_new = tl.minimum(tl.maximum(c_new, -cell_clip), cell_clip)
    if HAS_PEEPHOLE:
        z_o += tl.load(peephole_ptr + (G - 2) * U + units, mask=in_row, other=0.0) * c_new
    o = activation(z_o, RECURRENT_ACTIVATION)
    cell_input = c_new
    if LAYER_NORM:  # LN(C) * cell_gain + cell_shift, over the row's U units
        normalized_c, _ = _normalized_rows(c_new, inside, U)
        cell_input = (normalized_c * tl.load(cell_gain_ptr + units, mask=in_row, other=0.0)
                      + tl.load(cell_shift_ptr + units, mask=in_row, other=0.0))
    h_new = rounded(o * activation(cell_input, ACTIVATION), ROUND_H)

    if not COUPLED:
        tl.store(z, i, mask=inside)
    tl.store(z + (G - 3) * U, f, mask=inside)
    tl.store(z + (G - 2) * U, c_tilde, mask=inside)
    tl.store(z + (G - 1) * U, o, mask=inside)

    if HAS_KEEP_C:
        keep = tl.load(keep_c_ptr + rows * T * U + s * U + units, mask=inside, other=0) != 0
        c_new = tl.where(keep, c_prev, c_new)
    if TRACE:
        tl.store(trace_c_ptr + s * B * U + state, c_new, mask=inside)
    if HAS_MASK:
        counts = tl.load(mask_ptr + rows * T + t, mask=rows < B, other=0) != 0
        c_new = tl.where(counts, c_new, c_prev)
    tl.store(c_ptr + (s + 1) * B * U + state, c_new, mask=inside)
    if PROJECTED:
        tl.store(m_ptr + s * B * U + state, h_new, mask=inside)
    else:
        h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
        store_h_and_output(h_new, h_prev, h_ptr, y_ptr, mask_ptr, keep_h_ptr, trace_h_ptr, rows, units, inside, s,
                           t, B, U, T, HAS_MASK, HAS_KEEP_H, ZERO_OUTPUT, TRACE)


@triton.jit
def lstm_output_step(projected_ptr, h_ptr, y_ptr, mask_ptr, keep_h_ptr, trace_h_ptr, s, t, B, P, T,
                     HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                     ROUND_H: tl.constexpr, TRACE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """A projected step's h[s+1] and y[s] from m[s] @ projection ([B, P])."""
    rows, cols, inside = tile(B, P, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    h_new = rounded(tl.load(projected_ptr + rows * P + cols, mask=inside, other=0.0), ROUND_H)
    h_prev = tl.load(h_ptr + s * B * P + rows * P + cols, mask=inside, other=0.0)
    store_h_and_output(h_new, h_prev, h_ptr, y_ptr, mask_ptr, keep_h_ptr, trace_h_ptr, rows, cols, inside, s, t, B,
                       P, T, HAS_MASK, HAS_KEEP_H, ZERO_OUTPUT, TRACE)


@triton.jit
def lstm_output_backward_step(dh_new_ptr, dh_ptr, dy_ptr, carry_ptr, mask_ptr, keep_h_ptr, s, t, B, P, T,
                              dy_stride_s, dy_stride_b, HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr,
                              ZERO_OUTPUT: tl.constexpr, HAS_DY: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_U: tl.constexpr):
    """`lstm_output_step` backwards: the gradient of step s's projected h, into dh_new [T, B, P];
    dh becomes the part of h[s]'s that bypasses the step."""
    rows, cols, inside = tile(B, P, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    dh_new, dh_pass = h_gradient(dh_ptr, dy_ptr, carry_ptr, mask_ptr, keep_h_ptr, rows, cols, inside, s, t, B, P, T,
                                 dy_stride_s, dy_stride_b, HAS_MASK, HAS_KEEP_H, ZERO_OUTPUT, HAS_DY)
    tl.store(dh_new_ptr + s * B * P + rows * P + cols, dh_new, mask=inside)
    tl.store(dh_ptr + rows * P + cols, dh_pass, mask=inside)


@triton.jit
def _accumulate(pointer, value, inside):
    tl.store(pointer, tl.load(pointer, mask=inside, other=0.0) + value, mask=inside)


@triton.jit
def lstm_backward_step(z_ptr, a_ptr, rstd_h_ptr, c_ptr, dm_ptr, dy_ptr, dh_ptr, dc_ptr, carry_ptr, mask_ptr,
                       keep_h_ptr, keep_c_ptr, peephole_ptr, gate_gain_ptr, cell_gain_ptr, cell_shift_ptr,
                       clip_ptr, d_peephole_ptr, d_gate_gain_ptr, d_cell_gain_ptr, d_cell_shift_ptr,
                       s, t, B, U, T, dy_stride_s, dy_stride_b,
                       COUPLED: tl.constexpr, ACTIVATION: tl.constexpr, RECURRENT_ACTIVATION: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_KEEP_H: tl.constexpr, HAS_KEEP_C: tl.constexpr,
                       HAS_PEEPHOLE: tl.constexpr, HAS_CLIP: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                       LAYER_NORM: tl.constexpr, PROJECTED: tl.constexpr, HAS_DY: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s backwards: the activated gates z[s] -> dz[s] (in place); with layer norm a[s] -> the
    gradient of h[s-1] U (in place), which the caller carries to h through the product (without,
    dz[s] is it). dc: c[s+1]'s gradient becomes c[s]'s. The gradient of the step's new h comes from
    dh, dy and carry (`h_gradient`), or projected from dm [B, U] (m[s]'s). d_peephole [G-1, B, U],
    d_gate_gain [B, G*U] (h U's gain), d_cell_gain and d_cell_shift [B, U] sum the parameters'
    gradients per row."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    in_row = units < U
    G: tl.constexpr = 3 if COUPLED else 4
    z = z_ptr + s * B * G * U + rows * G * U + units
    state = rows * U + units
    if PROJECTED:
        dh_new = tl.load(dm_ptr + state, mask=inside, other=0.0)
    else:
        dh_new, dh_pass = h_gradient(dh_ptr, dy_ptr, carry_ptr, mask_ptr, keep_h_ptr, rows, units, inside, s, t, B,
                                     U, T, dy_stride_s, dy_stride_b, HAS_MASK, HAS_KEEP_H, ZERO_OUTPUT, HAS_DY)
        tl.store(dh_ptr + state, dh_pass, mask=inside)
    dc_next = tl.load(dc_ptr + state, mask=inside, other=0.0)
    dc_new = dc_next
    dc_pass = tl.zeros(dc_next.shape, dc_next.dtype)
    if HAS_MASK:
        counts = tl.load(mask_ptr + rows * T + t, mask=rows < B, other=0) != 0
        dc_new = tl.where(counts, dc_next, 0.0)
        dc_pass = tl.where(counts, 0.0, dc_next)
    if HAS_KEEP_C:
        keep = tl.load(keep_c_ptr + rows * T * U + s * U + units, mask=inside, other=0) != 0
        dc_pass += tl.where(keep, dc_new, 0.0)
        dc_new = tl.where(keep, 0.0, dc_new)

    c_prev = tl.load(c_ptr + s * B * U + state, mask=inside, other=0.0)
    f = tl.load(z + (G - 3) * U, mask=inside, other=0.0)
    c_tilde = tl.load(z + (G - 2) * U, mask=inside, other=0.0)
    o = tl.load(z + (G - 1) * U, mask=inside, other=0.0)
    if COUPLED:
        i = 1.0 - f
    else:
        i = tl.load(z, mask=inside, other=0.0)
    c_raw = f * c_prev + i * c_tilde
    c_new = c_raw
    if HAS_CLIP:
        cell_clip = tl.load(clip_ptr)
        c_new = tl.minimum(tl.maximum(c_raw, -cell_clip), cell_clip)
    if LAYER_NORM:
        normalized_c, rstd_c = _normalized_rows(c_new, inside, U)
        cell_gain = tl.load(cell_gain_ptr + units, mask=in_row, other=0.0)
        cell_output = activation(normalized_c * cell_gain + tl.load(cell_shift_ptr + units, mask=in_row, other=0.0),
                                  ACTIVATION)
        d_cell_input = dh_new * o * derivative(cell_output, ACTIVATION)
        _accumulate(d_cell_shift_ptr + state, d_cell_input, inside)
        _accumulate(d_cell_gain_ptr + state, d_cell_input * normalized_c, inside)
        dc = dc_new + _layer_norm_backward(tl.where(inside, d_cell_input * cell_gain, 0.0), normalized_c, rstd_c,
                                           inside, U)
    else:
        cell_output = activation(c_new, ACTIVATION)
        dc = dc_new + dh_new * o * derivative(cell_output, ACTIVATION)
    dz_o = dh_new * cell_output * derivative(o, RECURRENT_ACTIVATION)
    if HAS_PEEPHOLE:
        dc += dz_o * tl.load(peephole_ptr + (G - 2) * U + units, mask=in_row, other=0.0)
    if HAS_CLIP:
        dc = tl.where((c_raw >= -cell_clip) & (c_raw <= cell_clip), dc, 0.0)
    di = dc * c_tilde
    df = dc * c_prev
    dz_c = dc * i * derivative(c_tilde, ACTIVATION)
    dc_prev = dc_pass + dc * f
    if COUPLED:
        dz_f = (df - di) * derivative(f, RECURRENT_ACTIVATION)
    else:
        dz_i = di * derivative(i, RECURRENT_ACTIVATION)
        dz_f = df * derivative(f, RECURRENT_ACTIVATION)
    if HAS_PEEPHOLE:
        dc_prev += dz_f * tl.load(peephole_ptr + (G - 3) * U + units, mask=in_row, other=0.0)
        _accumulate(d_peephole_ptr + (G - 3) * B * U + state, dz_f * c_prev, inside)
        _accumulate(d_peephole_ptr + (G - 2) * B * U + state, dz_o * c_new, inside)
        if not COUPLED:
            dc_prev += dz_i * tl.load(peephole_ptr + units, mask=in_row, other=0.0)
            _accumulate(d_peephole_ptr + state, dz_i * c_prev, inside)

    if not COUPLED:
        tl.store(z, dz_i, mask=inside)
    tl.store(z + (G - 3) * U, dz_f, mask=inside)
    tl.store(z + (G - 2) * U, dz_c, mask=inside)
    tl.store(z + (G - 1) * U, dz_o, mask=inside)
    tl.store(dc_ptr + state, dc_prev, mask=inside)

    if LAYER_NORM:  # through LN(h U) * gain: the gradient of h U, over the row's G*U columns
        a = a_ptr + s * B * G * U + rows * G * U + units
        gain = gate_gain_ptr + G * U + units
        d_gain = d_gate_gain_ptr + rows * G * U + units
        a_f = tl.load(a + (G - 3) * U, mask=inside, other=0.0)
        a_c = tl.load(a + (G - 2) * U, mask=inside, other=0.0)
        a_o = tl.load(a + (G - 1) * U, mask=inside, other=0.0)
        da_f = tl.where(inside, dz_f * tl.load(gain + (G - 3) * U, mask=in_row, other=0.0), 0.0)
        da_c = tl.where(inside, dz_c * tl.load(gain + (G - 2) * U, mask=in_row, other=0.0), 0.0)
        da_o = tl.where(inside, dz_o * tl.load(gain + (G - 1) * U, mask=in_row, other=0.0), 0.0)
        _accumulate(d_gain + (G - 3) * U, dz_f * a_f, inside)
        _accumulate(d_gain + (G - 2) * U, dz_c * a_c, inside)
        _accumulate(d_gain + (G - 1) * U, dz_o * a_o, inside)
        total = tl.sum(da_f + da_c + da_o, axis=1)
        total_products = tl.sum(da_f * a_f + da_c * a_c + da_o * a_o, axis=1)
        if not COUPLED:
            a_i = tl.load(a, mask=inside, other=0.0)
            da_i = tl.where(inside, dz_i * tl.load(gain, mask=in_row, other=0.0), 0.0)
            _accumulate(d_gain, dz_i * a_i, inside)
            total += tl.sum(da_i, axis=1)
            total_products += tl.sum(da_i * a_i, axis=1)
        mean_d = (total / (G * U))[:, None]
        mean_dn = (total_products / (G * U))[:, None]
        rstd = tl.load(rstd_h_ptr + s * B + rows, mask=rows < B, other=0.0)
        tl.store(a + (G - 3) * U, rstd * (da_f - mean_d - a_f * mean_dn), mask=inside)
        tl.store(a + (G - 2) * U, rstd * (da_c - mean_d - a_c * mean_dn), mask=inside)
        tl.store(a + (G - 1) * U, rstd * (da_o - mean_d - a_o * mean_dn), mask=inside)
        if not COUPLED:
            tl.store(a, rstd * (da_i - mean_d - a_i * mean_dn), mask=inside)
