"""Numba loops of the fused CPU kernel: the recurrence forward, its hand-derived backward
(BPTT over the saved gates) and single-step functions for streaming inference.

Everything here works on NumPy arrays in time-major processing order (go_backwards already
applied by the caller):

    xw    [T, B, G*U]  the input projection of every step (bias and input dropout included)
    keep  [T, B]       uint8 step mask, or shape (0, 0) for "no mask"
    rd    [G, B, U]    recurrent dropout keep-masks, or shape (0, 0, 0)

Saved for the backward: Hs/Cs [T+1, B, U] (the states before/after every step), the activated
gates [T, B, G*U] and per-cell extras. The backward writes dZ (the gradient of the gate
pre-activations, zero at masked steps) and the gradients of the initial states; the weight
gradients are then one matrix product each over all steps (done by the caller).

Activations are codes (see ACT_CODES); their derivatives are taken from their outputs.
Compiled lazily on first use and cached on disk (cache=True).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fused_cpu import ACT_CODES  # noqa: F401  (tanh 0, sigmoid 1, relu 2, linear 3, hard_sigmoid 4, tf 5)

# Below this many batch rows the products are plain loops (no BLAS call overhead); above, sgemm/dgemm.
_SMALL_BATCH = 0


# ----- activations ----------------------------------------------------------------------------
# exp without SVML: Cody-Waite range reduction, a Taylor polynomial (degree 12 for float64
# results, 7 for float32) and 2^k from the exponent bits; written so that LLVM vectorises it.
_LN2HI = 6.93147180369123816490e-01
_LN2LO = 1.90821492927058770002e-10
_LOG2E = 1.4426950408889634


@njit(cache=True, fastmath={"contract"})
def _vexp(e, kk, kf, n, lowp):
    """e[:n] = exp(e[:n]) (float64 scratch); kk int64 scratch, kf its float64 view."""
    if lowp:
        for j in range(n):
            x = min(max(e[j], -708.0), 708.0)
            k = np.floor(x * _LOG2E + 0.5)
            r = (x - k * _LN2HI) - k * _LN2LO
            e[j] = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (
                1.0 / 120 + r * (1.0 / 720 + r * (1.0 / 5040)))))))
            kk[j] = (np.int64(k) + 1023) << 52
    else:
        for j in range(n):
            x = min(max(e[j], -708.0), 708.0)
            k = np.floor(x * _LOG2E + 0.5)
            r = (x - k * _LN2HI) - k * _LN2LO
            e[j] = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
                1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800 + r * (
                    1.0 / 39916800 + r * (1.0 / 479001600))))))))))))
            kk[j] = (np.int64(k) + 1023) << 52
    for j in range(n):
        e[j] *= kf[j]


@njit(cache=True, fastmath={"contract"})
def _act_block(z, lo, hi, code, E, KK, KF, lowp):
    """z[:, lo:hi] = act(z[:, lo:hi]) in place, z [B, N]; E/KK/KF scratch of >= B*(hi-lo)."""
    B = z.shape[0]
    w = hi - lo
    if code == 0 or code == 1:
        scale = 2.0 if code == 0 else -1.0
        for b in range(B):
            base = b * w - lo
            for j in range(lo, hi):
                E[base + j] = scale * z[b, j]
        _vexp(E, KK, KF, B * w, lowp)
        for b in range(B):
            base = b * w - lo
            if code == 0:
                for j in range(lo, hi):
                    z[b, j] = 1.0 - 2.0 / (E[base + j] + 1.0)
            else:
                for j in range(lo, hi):
                    z[b, j] = 1.0 / (1.0 + E[base + j])
    elif code == 2:
        for b in range(B):
            for j in range(lo, hi):
                v = z[b, j]
                if not v > 0:
                    z[b, j] = 0.0 if v == v else v
    elif code == 4:
        for b in range(B):
            for j in range(lo, hi):
                z[b, j] = min(max(z[b, j] / 6.0 + 0.5, 0.0), 1.0)
    elif code == 5:
        for b in range(B):
            for j in range(lo, hi):
                z[b, j] = min(max(0.2 * z[b, j] + 0.5, 0.0), 1.0)


@njit(cache=True)
def _scratch(n):
    E = np.empty(max(n, 1), dtype=np.float64)
    KK = np.empty(max(n, 1), dtype=np.int64)
    return E, KK, KK.view(np.float64)


@njit(cache=True, inline="always")
def _dact(code, y):
    """The activation's derivative, from its output y."""
    if code == 0:
        return 1.0 - y * y
    if code == 1:
        return y * (1.0 - y)
    if code == 2:
        return 1.0 if y > 0 else 0.0
    if code == 3:
        return 1.0
    if code == 4:
        return 1.0 / 6.0 if (y > 0 and y < 1) else 0.0
    return 0.2 if (y > 0 and y < 1) else 0.0


# ----- products -------------------------------------------------------------------------------
@njit(cache=True)
def _mm(A, W, out, c0, c1, scale, has_scale, tmp_a, tmp_o):
    """out[:, c0:c1] = (A * scale) @ W[:, c0:c1];  A [B, K], W [K, N]."""
    B, K = A.shape
    if B <= _SMALL_BATCH:
        for b in range(B):
            for j in range(c0, c1):
                out[b, j] = 0.0
            for k in range(K):
                v = A[b, k]
                if has_scale:
                    v = v * scale[b, k]
                for j in range(c0, c1):
                    out[b, j] += v * W[k, j]
        return
    if has_scale:
        for b in range(B):
            for k in range(K):
                tmp_a[b, k] = A[b, k] * scale[b, k]
        src = tmp_a
    else:
        src = A
    if c0 == 0 and c1 == W.shape[1] and out.shape[1] == c1:
        np.dot(src, W, out)
    else:
        res = np.dot(src, np.ascontiguousarray(W[:, c0:c1]))
        for b in range(B):
            for j in range(c0, c1):
                out[b, j] = res[b, j - c0]


@njit(cache=True)
def _mmt_acc(dZ, c0, c1, WT, out, scale, has_scale):
    """out += (dZ[:, c0:c1] @ WT[c0:c1, :]) * scale;  dZ [B, N], WT [N, K], out [B, K]."""
    B = dZ.shape[0]
    K = WT.shape[1]
    if B <= _SMALL_BATCH:
        for b in range(B):
            if has_scale:
                acc = np.zeros(K, dtype=out.dtype)
                for j in range(c0, c1):
                    d = dZ[b, j]
                    for k in range(K):
                        acc[k] += d * WT[j, k]
                for k in range(K):
                    out[b, k] += acc[k] * scale[b, k]
            else:
                for j in range(c0, c1):
                    d = dZ[b, j]
                    for k in range(K):
                        out[b, k] += d * WT[j, k]
        return
    if c0 == 0 and c1 == WT.shape[0]:
        res = np.dot(dZ, WT)
    else:
        res = np.dot(np.ascontiguousarray(dZ[:, c0:c1]), np.ascontiguousarray(WT[c0:c1]))
    if has_scale:
        for b in range(B):
            for k in range(K):
                out[b, k] += res[b, k] * scale[b, k]
    else:
        for b in range(B):
            for k in range(K):
                out[b, k] += res[b, k]


@njit(cache=True)
def _rec_product(hp, R, rd, out, gates, tmp_a, tmp_o):
    """out[:, :G*U] = per gate (hp * rd[g]) @ R[:, g], or hp @ R without dropout masks."""
    U = hp.shape[1]
    if rd.shape[0] == 0:
        _mm(hp, R, out, 0, gates * U, tmp_a, False, tmp_a, tmp_o)
    else:
        for g in range(gates):
            _mm(hp, R, out, g * U, (g + 1) * U, rd[g], True, tmp_a, tmp_o)


@njit(cache=True)
def _rec_backward(dZ, RT, rd, out, gates, dummy):
    """out += per gate (dZ[:, g] @ R[:, g]^T) * rd[g]."""
    U = out.shape[1]
    if rd.shape[0] == 0:
        _mmt_acc(dZ, 0, gates * U, RT, out, dummy, False)
    else:
        for g in range(gates):
            _mmt_acc(dZ, g * U, (g + 1) * U, RT, out, rd[g], True)


@njit(cache=True, inline="always")
def _d_output(dY, seq, b, s, T, j):
    if seq:
        return dY[b, s, j]
    if s == T - 1:
        return dY[b, 0, j]  # return_sequences=False: dY [B, 1, U], the last step only
    return 0.0


# ----- LSTM -----------------------------------------------------------------------------------
@njit(cache=True, fastmath={"contract"})
def lstm_forward(xw, R, rd, keep, zero_out, act, ract, Y, Hs, Cs, G, TC):
    T, B, GU = xw.shape
    U = GU // 4
    lowp = xw.itemsize == 4
    has_mask = keep.shape[0] > 0
    tmp_a = np.empty((B, U), dtype=xw.dtype)
    tmp_o = np.empty((B, U), dtype=xw.dtype)
    E, KK, KF = _scratch(B * GU)
    for s in range(T):
        hp = Hs[s]
        z = G[s]
        _rec_product(hp, R, rd, z, 4, tmp_a, tmp_o)
        for b in range(B):
            row = z[b]
            xr = xw[s, b]
            for j in range(GU):
                row[j] += xr[j]
        if ract == act:
            _act_block(z, 0, 4 * U, act, E, KK, KF, lowp)
        else:
            _act_block(z, 0, 2 * U, ract, E, KK, KF, lowp)
            _act_block(z, 2 * U, 3 * U, act, E, KK, KF, lowp)
            _act_block(z, 3 * U, 4 * U, ract, E, KK, KF, lowp)
        tc = TC[s]
        for b in range(B):
            row = z[b]
            cp = Cs[s, b]
            for j in range(U):
                tc[b, j] = row[U + j] * cp[j] + row[j] * row[2 * U + j]
        _act_block(tc, 0, U, act, E, KK, KF, lowp)
        for b in range(B):
            kept = (not has_mask) or keep[s, b] != 0
            row = z[b]
            if kept:
                for j in range(U):
                    Cs[s + 1, b, j] = row[U + j] * Cs[s, b, j] + row[j] * row[2 * U + j]
                    h = row[3 * U + j] * tc[b, j]
                    Hs[s + 1, b, j] = h
                    Y[b, s, j] = h
            else:
                for j in range(U):
                    Cs[s + 1, b, j] = Cs[s, b, j]
                    Hs[s + 1, b, j] = hp[b, j]
                    Y[b, s, j] = 0.0 if (zero_out or s == 0) else Y[b, s - 1, j]


@njit(cache=True, fastmath={"contract"})
def lstm_backward(dY, seq, dh, dc, Cs, G, TC, RT, rd, keep, zero_out, act, ract, dZ):
    """dh, dc: in the gradients of the final states, out those of the initial states."""
    T, B, GU = G.shape
    U = GU // 4
    has_mask = keep.shape[0] > 0
    carry = np.zeros((B, U), dtype=G.dtype)
    dhp = np.empty((B, U), dtype=G.dtype)
    for s in range(T - 1, -1, -1):
        for b in range(B):
            kept = (not has_mask) or keep[s, b] != 0
            d = dZ[s, b]
            if kept:
                gr = G[s, b]
                tc = TC[s, b]
                cp = Cs[s, b]
                for j in range(U):
                    dhn = dh[b, j] + _d_output(dY, seq, b, s, T, j) + carry[b, j]
                    carry[b, j] = 0.0
                    i = gr[j]
                    f = gr[U + j]
                    g = gr[2 * U + j]
                    o = gr[3 * U + j]
                    t = tc[j]
                    dct = dc[b, j] + dhn * o * _dact(act, t)
                    d[j] = dct * g * _dact(ract, i)
                    d[U + j] = dct * cp[j] * _dact(ract, f)
                    d[2 * U + j] = dct * i * _dact(act, g)
                    d[3 * U + j] = dhn * t * _dact(ract, o)
                    dc[b, j] = dct * f
            else:
                for j in range(GU):
                    d[j] = 0.0
                if not zero_out:
                    for j in range(U):
                        carry[b, j] += _d_output(dY, seq, b, s, T, j)
        dhp[:, :] = 0.0
        _rec_backward(dZ[s], RT, rd, dhp, 4, dhp)
        for b in range(B):
            if (not has_mask) or keep[s, b] != 0:
                for j in range(U):
                    dh[b, j] = dhp[b, j]


# ----- GRU ------------------------------------------------------------------------------------
@njit(cache=True)
def gru_forward(xw, R, brec, rd, keep, zero_out, act, ract, reset_after, Y, Hs, G, EX, rec):
    """G: z | r | h_tilde. EX [T, B, U]: reset_after the recurrent candidate term h@R_h + b_h;
    else r * h_prev * rd_h (the input of the candidate's recurrent product)."""
    T, B, GU = xw.shape
    U = GU // 3
    has_mask = keep.shape[0] > 0
    has_rd = rd.shape[0] > 0
    has_brec = brec.shape[0] > 0
    tmp_a = np.empty((B, U), dtype=xw.dtype)
    tmp_o = np.empty((B, U), dtype=xw.dtype)
    lowp = xw.itemsize == 4
    E, KK, KF = _scratch(B * GU)
    for s in range(T):
        hp = Hs[s]
        z = G[s]
        if reset_after:
            _rec_product(hp, R, rd, rec, 3, tmp_a, tmp_o)
        else:
            if has_rd:
                for g in range(2):
                    _mm(hp, R, rec, g * U, (g + 1) * U, rd[g], True, tmp_a, tmp_o)
            else:
                _mm(hp, R, rec, 0, 2 * U, tmp_a, False, tmp_a, tmp_o)
        for b in range(B):
            row = z[b]
            xr = xw[s, b]
            rr = rec[b]
            for j in range(2 * U):
                row[j] = xr[j] + rr[j]
            if has_brec:
                for j in range(2 * U):
                    row[j] += brec[j]
        _act_block(z, 0, 2 * U, ract, E, KK, KF, lowp)
        if reset_after:
            for b in range(B):
                row = z[b]
                ex = EX[s, b]
                for j in range(U):
                    hh = rec[b, 2 * U + j]
                    if has_brec:
                        hh += brec[2 * U + j]
                    ex[j] = hh
                    row[2 * U + j] = xw[s, b, 2 * U + j] + row[U + j] * hh
            _act_block(z, 2 * U, 3 * U, act, E, KK, KF, lowp)
        else:
            ex = EX[s]
            for b in range(B):
                for j in range(U):
                    v = G[s, b, U + j] * hp[b, j]
                    if has_rd:
                        v = v * rd[2, b, j]
                    ex[b, j] = v
            _mm(ex, R, rec, 2 * U, 3 * U, tmp_a, False, tmp_a, tmp_o)
            for b in range(B):
                row = z[b]
                for j in range(U):
                    row[2 * U + j] = xw[s, b, 2 * U + j] + rec[b, 2 * U + j]
            _act_block(z, 2 * U, 3 * U, act, E, KK, KF, lowp)
        for b in range(B):
            kept = (not has_mask) or keep[s, b] != 0
            row = z[b]
            if kept:
                for j in range(U):
                    zz = row[j]
                    h = zz * hp[b, j] + (1.0 - zz) * row[2 * U + j]
                    Hs[s + 1, b, j] = h
                    Y[b, s, j] = h
            else:
                for j in range(U):
                    Hs[s + 1, b, j] = hp[b, j]
                    Y[b, s, j] = 0.0 if (zero_out or s == 0) else Y[b, s - 1, j]


@njit(cache=True, fastmath={"contract"})
def gru_backward(dY, seq, dh, Hs, G, EX, RT, rd, keep, zero_out, act, ract, reset_after, dZx, dZr):
    """dZx: gradient of the input projection [T, B, 3U]; dZr: of the recurrent pre-activations
    (reset_after: h@R + b_rec, all three blocks; else the z|r blocks and, in the h block, the
    gradient of the candidate's recurrent product)."""
    T, B, GU = G.shape
    U = GU // 3
    has_mask = keep.shape[0] > 0
    has_rd = rd.shape[0] > 0
    carry = np.zeros((B, U), dtype=G.dtype)
    dhp = np.empty((B, U), dtype=G.dtype)
    drh = np.empty((B, U), dtype=G.dtype)
    dhn_all = np.empty((B, U), dtype=G.dtype)
    for s in range(T - 1, -1, -1):
        hp = Hs[s]
        dx = dZx[s]
        dr_ = dZr[s]
        for b in range(B):
            kept = (not has_mask) or keep[s, b] != 0
            if kept:
                gr = G[s, b]
                for j in range(U):
                    dhn = dh[b, j] + _d_output(dY, seq, b, s, T, j) + carry[b, j]
                    carry[b, j] = 0.0
                    dhn_all[b, j] = dhn
                    zz = gr[j]
                    ht = gr[2 * U + j]
                    dah = dhn * (1.0 - zz) * _dact(act, ht)
                    daz = dhn * (hp[b, j] - ht) * _dact(ract, zz)
                    dx[b, j] = daz
                    dx[b, 2 * U + j] = dah
                    dr_[b, j] = daz
                    dhp[b, j] = dhn * zz
                    if reset_after:
                        r = gr[U + j]
                        dar = dah * EX[s, b, j] * _dact(ract, r)
                        dx[b, U + j] = dar
                        dr_[b, U + j] = dar
                        dr_[b, 2 * U + j] = dah * r
                    else:
                        dr_[b, 2 * U + j] = dah
            else:
                for j in range(GU):
                    dx[b, j] = 0.0
                    dr_[b, j] = 0.0
                for j in range(U):
                    dhp[b, j] = 0.0
                if not zero_out:
                    for j in range(U):
                        carry[b, j] += _d_output(dY, seq, b, s, T, j)
        if reset_after:
            _rec_backward(dr_, RT, rd, dhp, 3, dhp)
        else:
            # gradient of the candidate's recurrent input r * h * rd_h
            drh[:, :] = 0.0
            _mmt_acc(dr_, 2 * U, 3 * U, RT, drh, dhp, False)
            for b in range(B):
                if (not has_mask) or keep[s, b] != 0:
                    gr = G[s, b]
                    for j in range(U):
                        v = drh[b, j]
                        if has_rd:
                            v = v * rd[2, b, j]
                        r = gr[U + j]
                        dar = v * hp[b, j] * _dact(ract, r)
                        dx[b, U + j] = dar
                        dr_[b, U + j] = dar
                        dhp[b, j] += v * r
            if has_rd:
                for g in range(2):
                    _mmt_acc(dr_, g * U, (g + 1) * U, RT, dhp, rd[g], True)
            else:
                _mmt_acc(dr_, 0, 2 * U, RT, dhp, dhp, False)
        for b in range(B):
            if (not has_mask) or keep[s, b] != 0:
                for j in range(U):
                    dh[b, j] = dhp[b, j]


# ----- SimpleRNN ------------------------------------------------------------------------------
@njit(cache=True)
def rnn_forward(xw, R, rd, keep, zero_out, act, Y, Hs, Z):
    """Z [T, B, U]: every step's activated output, masked steps included (for traces), or
    shape (0, 0, 0) for "not needed"."""
    T, B, U = xw.shape
    has_mask = keep.shape[0] > 0
    save_z = Z.shape[0] > 0
    tmp_a = np.empty((B, U), dtype=xw.dtype)
    tmp_o = np.empty((B, U), dtype=xw.dtype)
    z = np.empty((B, U), dtype=xw.dtype)
    lowp = xw.itemsize == 4
    E, KK, KF = _scratch(B * U)
    for s in range(T):
        hp = Hs[s]
        _rec_product(hp, R, rd, z, 1, tmp_a, tmp_o)
        for b in range(B):
            for j in range(U):
                z[b, j] += xw[s, b, j]
        _act_block(z, 0, U, act, E, KK, KF, lowp)
        if save_z:
            Z[s] = z
        for b in range(B):
            kept = (not has_mask) or keep[s, b] != 0
            if kept:
                row = z[b]
                for j in range(U):
                    Hs[s + 1, b, j] = row[j]
                    Y[b, s, j] = row[j]
            else:
                for j in range(U):
                    Hs[s + 1, b, j] = hp[b, j]
                    Y[b, s, j] = 0.0 if (zero_out or s == 0) else Y[b, s - 1, j]


@njit(cache=True, fastmath={"contract"})
def rnn_backward(dY, seq, dh, Hs, RT, rd, keep, zero_out, act, dZ):
    T, B, U = dZ.shape
    has_mask = keep.shape[0] > 0
    carry = np.zeros((B, U), dtype=dZ.dtype)
    dhp = np.empty((B, U), dtype=dZ.dtype)
    for s in range(T - 1, -1, -1):
        d = dZ[s]
        for b in range(B):
            kept = (not has_mask) or keep[s, b] != 0
            if kept:
                for j in range(U):
                    dhn = dh[b, j] + _d_output(dY, seq, b, s, T, j) + carry[b, j]
                    carry[b, j] = 0.0
                    d[b, j] = dhn * _dact(act, Hs[s + 1, b, j])
            else:
                for j in range(U):
                    d[b, j] = 0.0
                if not zero_out:
                    for j in range(U):
                        carry[b, j] += _d_output(dY, seq, b, s, T, j)
        dhp[:, :] = 0.0
        _rec_backward(d, RT, rd, dhp, 1, dhp)
        for b in range(B):
            if (not has_mask) or keep[s, b] != 0:
                for j in range(U):
                    dh[b, j] = dhp[b, j]


# ----- streaming: one step, state kept in caller-owned buffers --------------------------------
@njit(cache=True, fastmath={"contract"})
def lstm_step(x, W, WT, bias, xh, c, z, act, ract):
    """xh [B, D+U] holds (x_t, h); W = [kernel; recurrent_kernel] [D+U, 4U] and WT its
    transpose (batch 1 is a matrix-vector product, faster on the transposed layout);
    returns h_t (a copy)."""
    B, DU = xh.shape
    U = c.shape[1]
    D = DU - U
    lowp = xh.itemsize == 4
    for b in range(B):
        for k in range(D):
            xh[b, k] = x[b, k]
    if B == 1:
        np.dot(WT, xh[0], z[0])
    else:
        np.dot(xh, W, z)
    E, KK, KF = _scratch(B * 4 * U)
    for b in range(B):
        for j in range(4 * U):
            z[b, j] += bias[j]
    if ract == act:
        _act_block(z, 0, 4 * U, act, E, KK, KF, lowp)
    else:
        _act_block(z, 0, 2 * U, ract, E, KK, KF, lowp)
        _act_block(z, 2 * U, 3 * U, act, E, KK, KF, lowp)
        _act_block(z, 3 * U, 4 * U, ract, E, KK, KF, lowp)
    out = np.empty((B, U), dtype=xh.dtype)
    for b in range(B):
        row = z[b]
        for j in range(U):
            cv = row[U + j] * c[b, j] + row[j] * row[2 * U + j]
            c[b, j] = cv
            out[b, j] = cv
    _act_block(out, 0, U, act, E, KK, KF, lowp)
    for b in range(B):
        row = z[b]
        for j in range(U):
            h = row[3 * U + j] * out[b, j]
            out[b, j] = h
            xh[b, D + j] = h
    return out


@njit(cache=True, fastmath={"contract"})
def gru_step(x, W, bias, brec, R, xh, z, act, ract, reset_after):
    """W: the kernel [D, 3U], R: the recurrent kernel [U, 3U] (the candidate needs its recurrent
    term apart, so no stacked weight); xh [B, D+U] holds (x_t, h); returns h_t (a copy)."""
    B, DU = xh.shape
    GU = W.shape[1]
    U = GU // 3
    D = DU - U
    lowp = xh.itemsize == 4
    xin = np.empty((B, D), dtype=xh.dtype)
    h = np.empty((B, U), dtype=xh.dtype)
    for b in range(B):
        for k in range(D):
            xin[b, k] = x[b, k]
        for k in range(U):
            h[b, k] = xh[b, D + k]
    E, KK, KF = _scratch(B * GU)
    xwb = np.dot(xin, W)
    rec = np.dot(h, R)
    has_brec = brec.shape[0] > 0
    for b in range(B):
        for j in range(GU):
            xwb[b, j] += bias[j]
        for j in range(2 * U):
            z[b, j] = xwb[b, j] + rec[b, j]
            if has_brec:
                z[b, j] += brec[j]
    _act_block(z, 0, 2 * U, ract, E, KK, KF, lowp)
    if reset_after:
        for b in range(B):
            for j in range(U):
                hh = rec[b, 2 * U + j]
                if has_brec:
                    hh += brec[2 * U + j]
                z[b, 2 * U + j] = xwb[b, 2 * U + j] + z[b, U + j] * hh
    else:
        rh = np.empty((B, U), dtype=xh.dtype)
        for b in range(B):
            for j in range(U):
                rh[b, j] = z[b, U + j] * h[b, j]
        rec2 = np.dot(rh, np.ascontiguousarray(R[:, 2 * U:]))
        for b in range(B):
            for j in range(U):
                z[b, 2 * U + j] = xwb[b, 2 * U + j] + rec2[b, j]
    _act_block(z, 2 * U, 3 * U, act, E, KK, KF, lowp)
    out = np.empty((B, U), dtype=xh.dtype)
    for b in range(B):
        for j in range(U):
            zz = z[b, j]
            hv = zz * h[b, j] + (1.0 - zz) * z[b, 2 * U + j]
            out[b, j] = hv
            xh[b, D + j] = hv
    return out


@njit(cache=True, fastmath={"contract"})
def rnn_step(x, W, bias, xh, z, act):
    B, DU = xh.shape
    U = W.shape[1]
    D = DU - U
    lowp = xh.itemsize == 4
    for b in range(B):
        for k in range(D):
            xh[b, k] = x[b, k]
    np.dot(xh, W, z)
    E, KK, KF = _scratch(B * U)
    for b in range(B):
        for j in range(U):
            z[b, j] += bias[j]
    _act_block(z, 0, U, act, E, KK, KF, lowp)
    out = np.empty((B, U), dtype=xh.dtype)
    for b in range(B):
        for j in range(U):
            out[b, j] = z[b, j]
            xh[b, D + j] = z[b, j]
    return out


# ----- input projection (no dropout masks): time-major copy and one product ---------------------
@njit(cache=True)
def project(x, K, bias, backwards, xt, xw):
    """xt [T, B, D] = x [B, T, D] in processing order; xw [T*B, G*U] = xt @ K + bias."""
    B, T, D = x.shape
    for s in range(T):
        t = T - 1 - s if backwards else s
        for b in range(B):
            for k in range(D):
                xt[s, b, k] = x[b, t, k]
    np.dot(xt.reshape(T * B, D), K, xw)
    if bias.shape[0] > 0:
        N = xw.shape[1]
        for i in range(T * B):
            for j in range(N):
                xw[i, j] += bias[j]
