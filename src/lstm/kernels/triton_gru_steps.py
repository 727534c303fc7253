"""The Triton programs of triton_gru_simple_rnn.py: one GRU or SimpleRNN step's elementwise maths,
forward and hand-derived backward, for a tile of rows x units. The products (x @ kernel,
h @ recurrent_kernel, (r * h) @ U_h) are torch's GEMMs around them; this module imports triton,
which triton_gru_simple_rnn.py loads on first use.

Buffers (time-major, processing order s; G = 3 (GRU, blocks z|r|h) or 1 (SimpleRNN) of U columns):
    z      [T, B, G*U]  the input projection x_t W + b (GRU reset_after: b's input row;
                        SimpleRNN: plus h_{s-1} U), overwritten by the activated gates z_t|r_t|h_tilde
                        (SimpleRNN: activation(z)) forward, then by the gradients of the input
                        projection's pre-activations backward
    hr     [T, B, 3U]   GRU reset_after: h_{s-1} U (its h block becomes h_{s-1} U_h + the recurrent
                        bias's h block: what r multiplies), then its gradient (backward)
    rh     [T, B, U]    GRU not reset_after: (r_t * h_{s-1}), h_{s-1} after the candidate's
                        recurrent dropout mask, rounded as a product's operand: the candidate's
                        product is rh[s] @ U_h
    h      [T+1, B, U]  the states before step s at index s (h[0]: the initial state)
    y      [T, B, U]    the outputs
    mask   bool [B, T]  in time order (go_backwards reads index T-1-s)
    keep_h_block        [B, U] the h block's recurrent dropout keep-mask (scaled), not reset_after
    recurrent_bias      [3U] the recurrent row of a reset_after GRU's bias
Activation codes are native.ACTIVATION_CODES'; derivatives come from the activated values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_steps import activation, derivative, h_gradient, rounded, store_h_and_output, tile


@triton.jit
def gru_reset_step(z_ptr, zr_ptr, h_ptr, rh_ptr, keep_h_block_ptr, s, B, U,
                   RECURRENT_ACTIVATION: tl.constexpr, HAS_RECURRENT_DROPOUT: tl.constexpr,
                   ROUND_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """GRU not reset_after, step s before the candidate's product: z[s]'s z|r blocks plus zr
    [B, 2U] (h[s] U_z|r) -> z_t|r_t (in place); rh[s] = r_t * h[s] (times the h block's recurrent
    dropout mask), rounded as a product's operand."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    z = z_ptr + s * B * 3 * U + rows * 3 * U + units
    zr = zr_ptr + rows * 2 * U + units
    state = rows * U + units
    z_t = activation(tl.load(z, mask=inside, other=0.0) + tl.load(zr, mask=inside, other=0.0),
                      RECURRENT_ACTIVATION)
    r_t = activation(tl.load(z + U, mask=inside, other=0.0) + tl.load(zr + U, mask=inside, other=0.0),
                      RECURRENT_ACTIVATION)
    h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
    if HAS_RECURRENT_DROPOUT:
        h_prev = h_prev * tl.load(keep_h_block_ptr + state, mask=inside, other=0.0)
    tl.store(z, z_t, mask=inside)
    tl.store(z + U, r_t, mask=inside)
    tl.store(rh_ptr + s * B * U + state, rounded(r_t * h_prev, ROUND_H), mask=inside)


@triton.jit
def gru_forward_step(z_ptr, hr_ptr, h_ptr, y_ptr, mask_ptr, recurrent_bias_ptr, trace_h_ptr, s, t, B, U, T,
                     RESET_AFTER: tl.constexpr, ACTIVATION: tl.constexpr, RECURRENT_ACTIVATION: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_RECURRENT_BIAS: tl.constexpr, ZERO_OUTPUT: tl.constexpr,
                     ROUND_H: tl.constexpr, TRACE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s (time index t) -> z[s] = z_t|r_t|h_tilde, h[s+1], y[s].
    reset_after: z[s] holds the input projections, hr[s] h[s] U (its h block becomes h[s] U_h plus
    the recurrent bias's: what the backward's r gradient needs). Not reset_after: z[s] holds z_t|r_t
    (gru_reset_step) and x_h, hr [B, U] the candidate's product rh[s] @ U_h."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    z = z_ptr + s * B * 3 * U + rows * 3 * U + units
    state = rows * U + units
    h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
    x_h = tl.load(z + 2 * U, mask=inside, other=0.0)
    if RESET_AFTER:
        hr = hr_ptr + s * B * 3 * U + rows * 3 * U + units
        h_z = tl.load(hr, mask=inside, other=0.0)
        h_r = tl.load(hr + U, mask=inside, other=0.0)
        h_h = tl.load(hr + 2 * U, mask=inside, other=0.0)
        if HAS_RECURRENT_BIAS:
            h_z += tl.load(recurrent_bias_ptr + units, mask=units < U, other=0.0)
            h_r += tl.load(recurrent_bias_ptr + U + units, mask=units < U, other=0.0)
            h_h += tl.load(recurrent_bias_ptr + 2 * U + units, mask=units < U, other=0.0)
            tl.store(hr + 2 * U, h_h, mask=inside)
        z_t = activation(tl.load(z, mask=inside, other=0.0) + h_z, RECURRENT_ACTIVATION)
        r_t = activation(tl.load(z + U, mask=inside, other=0.0) + h_r, RECURRENT_ACTIVATION)
        h_tilde = activation(x_h + r_t * h_h, ACTIVATION)
        tl.store(z, z_t, mask=inside)
        tl.store(z + U, r_t, mask=inside)
    else:
        z_t = tl.load(z, mask=inside, other=0.0)
        h_tilde = activation(x_h + tl.load(hr_ptr + state, mask=inside, other=0.0), ACTIVATION)
    tl.store(z + 2 * U, h_tilde, mask=inside)
    h_new = rounded(z_t * h_prev + (1.0 - z_t) * h_tilde, ROUND_H)
    store_h_and_output(h_new, h_prev, h_ptr, y_ptr, mask_ptr, mask_ptr, trace_h_ptr, rows, units, inside, s, t, B, U,
                       T, HAS_MASK, False, ZERO_OUTPUT, TRACE)


@triton.jit
def gru_backward_step(z_ptr, hr_ptr, h_ptr, dy_ptr, dh_ptr, carry_ptr, mask_ptr, s, t, B, U, T,
                      dy_stride_s, dy_stride_b, HAS_DY: tl.constexpr, RESET_AFTER: tl.constexpr,
                      ACTIVATION: tl.constexpr, RECURRENT_ACTIVATION: tl.constexpr, HAS_MASK: tl.constexpr,
                      ZERO_OUTPUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s backwards: z[s] (z_t|r_t|h_tilde) -> the gradients of the input projection's blocks
    (in place); reset_after, hr[s] -> the gradients of h[s] U + the recurrent bias (in place); not
    reset_after, the r block is gru_reset_backward_step's (it needs the gradient of rh[s] first).
    dh (the gradient of h[s+1]) becomes the part of h[s]'s outside the products with U."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    z = z_ptr + s * B * 3 * U + rows * 3 * U + units
    state = rows * U + units
    dh_new, dh_pass = h_gradient(dh_ptr, dy_ptr, carry_ptr, mask_ptr, mask_ptr, rows, units, inside, s, t, B, U, T,
                                 dy_stride_s, dy_stride_b, HAS_MASK, False, ZERO_OUTPUT, HAS_DY)
    h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
    z_t = tl.load(z, mask=inside, other=0.0)
    h_tilde = tl.load(z + 2 * U, mask=inside, other=0.0)
    dz_z = dh_new * (h_prev - h_tilde) * derivative(z_t, RECURRENT_ACTIVATION)
    dz_h = dh_new * (1.0 - z_t) * derivative(h_tilde, ACTIVATION)
    tl.store(z, dz_z, mask=inside)
    tl.store(z + 2 * U, dz_h, mask=inside)
    if RESET_AFTER:
        hr = hr_ptr + s * B * 3 * U + rows * 3 * U + units
        r_t = tl.load(z + U, mask=inside, other=0.0)
        h_h = tl.load(hr + 2 * U, mask=inside, other=0.0)
        dz_r = dz_h * h_h * derivative(r_t, RECURRENT_ACTIVATION)
        tl.store(z + U, dz_r, mask=inside)
        tl.store(hr, dz_z, mask=inside)
        tl.store(hr + U, dz_r, mask=inside)
        tl.store(hr + 2 * U, dz_h * r_t, mask=inside)
    tl.store(dh_ptr + state, dh_pass + dh_new * z_t, mask=inside)


@triton.jit
def gru_reset_backward_step(z_ptr, drh_ptr, h_ptr, dh_ptr, keep_h_block_ptr, s, B, U,
                            RECURRENT_ACTIVATION: tl.constexpr, HAS_RECURRENT_DROPOUT: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """gru_reset_step backwards: drh [B, U] (the gradient of rh[s], dz_h @ U_h^T) -> z[s]'s r block
    (r_t -> its pre-activation's gradient); dh += the part of h[s]'s through r_t * h[s] (the
    rounding passes gradients unrounded)."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    z = z_ptr + s * B * 3 * U + rows * 3 * U + units
    state = rows * U + units
    drh = tl.load(drh_ptr + state, mask=inside, other=0.0)
    r_t = tl.load(z + U, mask=inside, other=0.0)
    h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
    d_h_prev = drh * r_t
    if HAS_RECURRENT_DROPOUT:
        keep = tl.load(keep_h_block_ptr + state, mask=inside, other=0.0)
        h_prev = h_prev * keep
        d_h_prev = d_h_prev * keep
    tl.store(z + U, drh * h_prev * derivative(r_t, RECURRENT_ACTIVATION), mask=inside)
    tl.store(dh_ptr + state, tl.load(dh_ptr + state, mask=inside, other=0.0) + d_h_prev, mask=inside)


@triton.jit
def simple_rnn_forward_step(z_ptr, h_ptr, y_ptr, mask_ptr, trace_h_ptr, s, t, B, U, T, ACTIVATION: tl.constexpr,
                            HAS_MASK: tl.constexpr, ZERO_OUTPUT: tl.constexpr, ROUND_H: tl.constexpr,
                            TRACE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s (time index t): z[s] (x W + b + h[s] U) -> activation(z[s]) (in place), h[s+1], y[s]."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    z = z_ptr + s * B * U + rows * U + units
    state = rows * U + units
    activated = activation(tl.load(z, mask=inside, other=0.0), ACTIVATION)
    tl.store(z, activated, mask=inside)
    h_prev = tl.load(h_ptr + s * B * U + state, mask=inside, other=0.0)
    store_h_and_output(rounded(activated, ROUND_H), h_prev, h_ptr, y_ptr, mask_ptr, mask_ptr, trace_h_ptr, rows, units,
                       inside, s, t, B, U, T, HAS_MASK, False, ZERO_OUTPUT, TRACE)


@triton.jit
def simple_rnn_backward_step(z_ptr, dy_ptr, dh_ptr, carry_ptr, mask_ptr, s, t, B, U, T, dy_stride_s,
                             dy_stride_b, HAS_DY: tl.constexpr, ACTIVATION: tl.constexpr, HAS_MASK: tl.constexpr,
                             ZERO_OUTPUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Step s backwards: z[s] (activated) -> its pre-activation's gradient (in place); dh (the
    gradient of h[s+1]) becomes the part of h[s]'s outside the product h[s] @ U."""
    rows, units, inside = tile(B, U, BLOCK_B, BLOCK_U)
    s = s.to(tl.int64)  # (offsets reach T * B * G * U: past int32 for large calls)
    z = z_ptr + s * B * U + rows * U + units
    state = rows * U + units
    dh_new, dh_pass = h_gradient(dh_ptr, dy_ptr, carry_ptr, mask_ptr, mask_ptr, rows, units, inside, s, t, B, U, T,
                                 dy_stride_s, dy_stride_b, HAS_MASK, False, ZERO_OUTPUT, HAS_DY)
    tl.store(z, dh_new * derivative(tl.load(z, mask=inside, other=0.0), ACTIVATION), mask=inside)
    tl.store(dh_ptr + state, dh_pass, mask=inside)
