// The LSTM variants' recurrence over raw buffers (rnn.h: variants::ForwardPass,
// variants::BackwardPass): peephole, layer norm, projection, coupled gates, cell clip and
// zoneout fused into one loop per pass, each thread running every step for its batch rows.

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "rnn.h"
#include "simd.h"
#include "threads.h"

namespace lstm_core {
namespace variants {
namespace {

constexpr double kLayerNormEps = 1e-5;  // reference.LAYER_NORM_EPS (haste's)

// 16 lanes of T as one value (GCC/Clang vector extension: one zmm for float with AVX-512): the
// layer norms' row reductions keep their partial sums in it, so the compiler neither serialises
// them nor interleaves iterations with shuffles (what it made of arrays of 16 partial sums)
template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(16 * sizeof(T))));
};

template <typename T>
inline typename Lanes<T>::V load_lanes(const T* p) {
  typename Lanes<T>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store_lanes(T* p, const typename Lanes<T>::V& v) {
  std::memcpy(p, &v, sizeof v);
}

// the sum of the 16 lanes as a tree: 4 dependent additions, not 16 (the row reductions sit on
// the recurrence's critical path)
template <typename T>
inline T lane_sum(const typename Lanes<T>::V& v) {
  T acc[16];
  std::memcpy(acc, &v, sizeof v);
#ifdef __AVX512F__  // (the portable tree below goes through the stack with narrowing reloads)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_add_ps(_mm512_loadu_ps(acc));
  if constexpr (std::is_same_v<T, double>)
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_loadu_pd(acc), _mm512_loadu_pd(acc + 8)));
#endif
  for (int width = 8; width; width >>= 1)
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  return acc[0];
}

// 1/std of x [n] and its mean (in `mean`): the mean first, then the squared deviations from it
// (two passes: a one-pass E[x^2] - E[x]^2, even shifted by the row's first value, lost up to ~270
// float32 epsilons on heavy-tailed rows and ~1000 where that value was an outlier; this form, 2-4)
template <typename T>
inline T row_stats(const T* __restrict__ x, int64_t n, T& mean) {
  typename Lanes<T>::V acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += load_lanes(x + j);
  T sum = lane_sum<T>(acc);
  for (; j < n; ++j) sum += x[j];
  mean = sum / T(n);
  typename Lanes<T>::V acc2 = {};
  for (j = 0; j + 16 <= n; j += 16) {
    const auto d = load_lanes(x + j) - mean;
    acc2 += d * d;
  }
  T sum_sq = lane_sum<T>(acc2);
  for (; j < n; ++j) sum_sq += (x[j] - mean) * (x[j] - mean);
  return T(1) / std::sqrt(sum_sq / T(n) + T(kLayerNormEps));
}

// d/dx of xhat = (x - mean(x)) rstd: dx = rstd (dy - mean(dy) - xhat mean(dy xhat)), dy in, dx out
// (may alias)
template <typename T>
inline void normalise_backward(const T* dy, const T* __restrict__ xhat, T rstd, T* dx, int64_t n) {
  typename Lanes<T>::V acc = {}, acc2 = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const auto d = load_lanes(dy + j);
    acc += d;
    acc2 += d * load_lanes(xhat + j);
  }
  T sum = lane_sum<T>(acc), dot = lane_sum<T>(acc2);
  for (; j < n; ++j) {
    sum += dy[j];
    dot += dy[j] * xhat[j];
  }
  const T a = sum / T(n), b = dot / T(n);
  for (j = 0; j < n; ++j) dx[j] = rstd * (dy[j] - a - xhat[j] * b);
}

// z = xhat g_x + ahat g_h + b, xhat = (xk - mean_x) rstd_x, ahat = (A - mean_a) rstd_a (written over
// A), one pass
template <typename T>
inline void gate_norms_forward(const T* __restrict__ xk, T mean_x, T rstd_x, T* __restrict__ a, T mean_a, T rstd_a,
                               const T* __restrict__ gx, const T* __restrict__ gh, const T* __restrict__ bias,
                               T* __restrict__ z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    a[j] = (a[j] - mean_a) * rstd_a;
    z[j] = (xk[j] - mean_x) * rstd_x * gx[j] + a[j] * gh[j] + bias[j];
  }
}

// Backward of z = xhat g_x + ahat g_h (+ b), xhat = LN(xk) = (xk - mean_x) rstd_x, ahat = LN(A), for
// one row in two passes: accumulates d g_x, d g_h (and d b if db), writes dxk and dA (d/dx of LN as
// in normalise_backward, its per-row terms folded: dxk = rstd_x dz g_x + c_x + k_x (xk - mean_x)).
// dx may be xk and da ahat (written element by element after they are read).
template <typename T>
inline void gate_norms_backward(const T* __restrict__ dz, const T* xk, T mean_x, T rstd_x, const T* ahat, T rstd_a,
                                const T* __restrict__ gx, const T* __restrict__ gh, T* __restrict__ dgx,
                                T* __restrict__ dgh, T* __restrict__ db, T* dx, T* da, int64_t n) {
  typename Lanes<T>::V sx = {}, sxx = {}, sa = {}, saa = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const auto d = load_lanes(dz + j), yx = d * load_lanes(gx + j), ya = d * load_lanes(gh + j),
               xhat = (load_lanes(xk + j) - mean_x) * rstd_x, ahat_j = load_lanes(ahat + j);
    sx += yx;
    sxx += yx * xhat;
    sa += ya;
    saa += ya * ahat_j;
    store_lanes(dgx + j, load_lanes(dgx + j) + d * xhat);
    store_lanes(dgh + j, load_lanes(dgh + j) + d * ahat_j);
    if (db) store_lanes(db + j, load_lanes(db + j) + d);
  }
  T tx = lane_sum<T>(sx), txx = lane_sum<T>(sxx), ta = lane_sum<T>(sa), taa = lane_sum<T>(saa);
  for (; j < n; ++j) {
    const T d = dz[j], yx = d * gx[j], ya = d * gh[j], xhat = (xk[j] - mean_x) * rstd_x;
    tx += yx;
    txx += yx * xhat;
    ta += ya;
    taa += ya * ahat[j];
    dgx[j] += d * xhat;
    dgh[j] += d * ahat[j];
    if (db) db[j] += d;
  }
  const T kx = -rstd_x * rstd_x * (txx / T(n)), cx = -rstd_x * (tx / T(n));
  const T ka = -rstd_a * (taa / T(n)), ca = -rstd_a * (ta / T(n));
  for (j = 0; j < n; ++j) {
    dx[j] = rstd_x * (dz[j] * gx[j]) + (cx + kx * (xk[j] - mean_x));
    da[j] = rstd_a * (dz[j] * gh[j]) + (ca + ka * ahat[j]);
  }
}

// Zoneout's keep flags of one row and step (problem.Zoneout): unit j of stream k is kept when
// the top 24 bits of splitmix64(seed + (n + 1) * golden), n = (base + j) * 2 + k, are below
// the threshold; base = ((offset + step) * B + row) * size, which no chunking of the call changes.
// Counter-based, so forward and backward draw the same flags with no mask memory.
inline void zoneout_flags(uint64_t seed, uint64_t threshold, int64_t base, int64_t n, int stream, uint8_t* keep) {
  for (int64_t j = 0; j < n; ++j) {
    uint64_t z = seed + (uint64_t((base + j) * 2 + stream) + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    keep[j] = (z >> 40) < threshold;
  }
}

// One stream's keep flags for one row and step, in `buffer`; nullptr when it has no zoneout.
inline const uint8_t* zoneout_row(uint64_t seed, uint64_t threshold, int64_t base, int64_t n, int stream,
                                  std::vector<uint8_t>& buffer) {
  if (!threshold) return nullptr;
  zoneout_flags(seed, threshold, base, n, stream, buffer.data());
  return buffer.data();
}

// gate offsets in a row of G*U: i f c o, or f c o when coupled (i = -1)
struct GateOffsets {
  int64_t i, f, c, o;
  GateOffsets(bool coupled, int64_t U)
      : i(coupled ? -1 : 0), f(coupled ? 0 : U), c(coupled ? U : 2 * U), o(coupled ? 2 * U : 3 * U) {}
};

// C before the clip, f C_{t-1} + i C̃, written once for both passes so the backward's recomputation
// from G and C_{t-1} equals the forward's value bit for bit: no saved copy of C, one row fewer
// written and read per step (kernel forward + backward at (32,80,100,64), 2 threads, paired medians
// of three runs: cell_clip -3% to -8%, layer norm -0.3% to -2.5%)
template <typename T>
inline T cell_update(T f, T c_prev, T i, T c_tilde) {
  return std::fma(f, c_prev, i * c_tilde);
}

// ForwardPass::run for batch rows [b0, b1) (the pointers at row 0)
template <typename T>
void variant_forward_rows(const Params<T>& v, const Flags& fl, int64_t b0, int64_t b1, T* X,
                          const T* h0, const T* c0, T* Y, T* hT, T* cT, T* G, T* Hp, T* Cp, T* Ahat,
                          T* rstd_h, T* mean_c, T* rstd_c, T* rstd_x, T* mean_x, T* Hu, T* Htr, T* Ctr) {
  const int64_t nr = b1 - b0, Tn = v.Tn, U = v.U, Ps = v.Ps, GU = v.GU;
  const GateOffsets off(fl.coupled, U);
  std::vector<T> A(fl.ln && fl.save ? 0 : nr * GU), h(h0 + b0 * Ps, h0 + b1 * Ps), c(c0 + b0 * U, c0 + b1 * U),
      prev(nr * Ps, T(0));
  std::vector<T> hm(v.rd ? nr * Ps : 0), z_scratch(fl.save ? 0 : GU), hu(nr * U), cnew(nr * U),
      r(fl.proj ? nr * Ps : 0);
  std::vector<uint8_t> keep_h(Ps), keep_c(U);
  std::vector<T> no_bias(v.bias ? 0 : GU, T(0)), rs_a(nr), mu_a(nr), rs_x(nr), mu_x(nr);
  const T* bias = v.bias ? v.bias : no_bias.data();
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    // the row's new state (zoneout, Keras masking) and output, from its h (hn) and C (cnew)
    auto finish_row = [&](int64_t b, const T* hn) {
      const int64_t row = (b0 + b) * Tn + t, prow = (b0 + b) * Tn + s;
      T* hb = &h[b * Ps];
      T* cb = &c[b * U];
      T* pb = &prev[b * Ps];
      const int64_t zrow = (v.zoneout_offset + s) * v.B + b0 + b;  // (problem.Zoneout's numbering)
      const uint8_t* kh = zoneout_row(v.zoneout_seed, v.keep_h, zrow * Ps, Ps, 0, keep_h);
      const uint8_t* kc = zoneout_row(v.zoneout_seed, v.keep_c, zrow * U, U, 1, keep_c);
      const T* cn = &cnew[b * U];
      if (Htr) {  // the step's own h and C (after zoneout), masked or not, as the reference's trace
        for (int64_t j = 0; j < Ps; ++j) Htr[prow * Ps + j] = (kh && kh[j]) ? hb[j] : hn[j];
        for (int64_t j = 0; j < U; ++j) Ctr[prow * U + j] = (kc && kc[j]) ? cb[j] : cn[j];
      }
      if (!v.mask || v.mask[row]) {
        if (kh) {
          for (int64_t j = 0; j < Ps; ++j) hb[j] = kh[j] ? hb[j] : hn[j];
        } else {
          std::copy(hn, hn + Ps, hb);
        }
        if (kc) {
          for (int64_t j = 0; j < U; ++j) cb[j] = kc[j] ? cb[j] : cn[j];
        } else {
          std::copy(cn, cn + U, cb);
        }
        std::copy(hb, hb + Ps, pb);
      } else if (fl.zero_out) {
        std::fill(pb, pb + Ps, T(0));
      }
      if (fl.seq) std::copy(pb, pb + Ps, Y + prow * Ps);
    };
    // A = h_{t-1} @ R; with layer norm in training straight into Ahat (normalised there in place)
    const bool in_ahat = fl.ln && fl.save;
    T* A0 = in_ahat ? Ahat + (b0 * Tn + t) * GU : A.data();
    const int64_t lda = in_ahat ? Tn * GU : GU;
    if (v.rd) {  // recurrent dropout: one keep-mask per gate on h_{t-1}
      for (int64_t g = 0; g < v.G; ++g) {
        const T* m = v.rd + (g * v.B + b0) * Ps;
        for (int64_t j = 0; j < nr * Ps; ++j) hm[j] = h[j] * m[j];
        mm_set<T>(nr, U, Ps, hm.data(), Ps, v.R + g * U, GU, A0 + g * U, lda);
      }
    } else {
      mm_set<T>(nr, GU, Ps, h.data(), Ps, v.R, GU, A0, lda);
    }
    if (fl.ln)  // the rows' statistics first, apart: independent reductions the CPU overlaps
      for (int64_t b = 0; b < nr; ++b) {
        rs_a[b] = row_stats(A0 + b * lda, GU, mu_a[b]);
        rs_x[b] = row_stats(X + ((b0 + b) * Tn + t) * GU, GU, mu_x[b]);
      }
    for (int64_t b = 0; b < nr; ++b) {
      const int64_t row = (b0 + b) * Tn + t;
      // this row's input at the next step (rows only written are left to the store buffer: write
      // prefetches held fill buffers and slowed the loop, measured 0.82 -> 0.76 ms at (32,80,100,64))
      if (s + 1 < Tn) prefetch_read(X + (row + (fl.backwards ? -1 : 1)) * GU, GU);
      T* a = A0 + b * lda;
      T* z = fl.save ? G + row * GU : z_scratch.data();
      T* xk = X + row * GU;
      // the row's h_{t-1} and C_{t-1} saved here, between the rows' math, and its new state and
      // output written at the end of its row: all rows' at once, these were bursts of stores to
      // uncached lines the loop waited on (forward at (32,80,100,64), 2 threads: cell_clip 0.99 ->
      // 0.94 ms, layer norm 1.19 -> 1.14 ms)
      if (fl.save) {
        std::copy(&h[b * Ps], &h[b * Ps] + Ps, Hp + row * Ps);
        std::copy(&c[b * U], &c[b * U] + U, Cp + row * U);
      }
      if (fl.ln) {  // z = LN(xk) g_x + LN(A) g_h + b in one pass after the statistics
        gate_norms_forward(xk, mu_x[b], rs_x[b], a, mu_a[b], rs_a[b], v.gain_x, v.gain_h, bias, z, GU);
        if (fl.save) {
          rstd_h[row] = rs_a[b];
          rstd_x[row] = rs_x[b];
          mean_x[row] = mu_x[b];
        }
      } else {
        for (int64_t j = 0; j < GU; ++j) z[j] = xk[j] + a[j] + bias[j];
      }
      const T* cp = &c[b * U];
      if (fl.peephole) {  // rows: i f o, or f o when coupled
        const T* pf = v.peep + (fl.coupled ? 0 : U);
        for (int64_t j = 0; j < U; ++j) z[off.f + j] += pf[j] * cp[j];
        if (!fl.coupled)
          for (int64_t j = 0; j < U; ++j) z[off.i + j] += v.peep[j] * cp[j];
      }
      if (!fl.coupled) act_inplace(fl.ract, z + off.i, U);
      act_inplace(fl.ract, z + off.f, U);
      act_inplace(fl.act, z + off.c, U);
      T* cn = &cnew[b * U];
      for (int64_t j = 0; j < U; ++j) {
        const T f = z[off.f + j], i = fl.coupled ? T(1) - f : z[off.i + j];
        cn[j] = cell_update(f, cp[j], i, z[off.c + j]);
      }
      if (fl.clip >= 0) {
        const T lo = T(-fl.clip), hi = T(fl.clip);
        for (int64_t j = 0; j < U; ++j) cn[j] = std::min(std::max(cn[j], lo), hi);
      }
      if (fl.peephole) {
        const T* po = v.peep + (fl.coupled ? U : 2 * U);
        for (int64_t j = 0; j < U; ++j) z[off.o + j] += po[j] * cn[j];
      }
      act_inplace(fl.ract, z + off.o, U);
      T* out = &hu[b * U];
      std::copy(cn, cn + U, out);
      if (fl.ln) {  // out = LN(C) g_c + b_c
        T mean;
        const T rs = row_stats(out, U, mean);
        for (int64_t j = 0; j < U; ++j) out[j] = (out[j] - mean) * rs * v.gain_c[j] + v.shift_c[j];
        if (fl.save) {
          mean_c[row] = mean;
          rstd_c[row] = rs;
        }
      }
      act_inplace(fl.act, out, U);
      for (int64_t j = 0; j < U; ++j) out[j] *= z[off.o + j];
      if (fl.save && fl.proj) std::copy(out, out + U, Hu + row * U);
      if (!fl.proj) finish_row(b, out);  // (with a projection: after its product, below)
    }
    if (fl.proj) {  // h = hu @ P for all rows, then their states
      mm_set<T>(nr, Ps, U, hu.data(), U, v.P, Ps, r.data(), Ps);
      for (int64_t b = 0; b < nr; ++b) finish_row(b, &r[b * Ps]);
    }
  }
  for (int64_t b = 0; b < nr; ++b) {
    std::copy(&h[b * Ps], &h[b * Ps] + Ps, hT + (b0 + b) * Ps);
    std::copy(&c[b * U], &c[b * U] + U, cT + (b0 + b) * U);
    if (!fl.seq) std::copy(&prev[b * Ps], &prev[b * Ps] + Ps, Y + (b0 + b) * Ps);
  }
}

// The cell's part of one row's backward: from dL/dhu (du) and the state's dL/dC_t (dcn) to the
// pre-activation gradients dz [G*U] and dL/dC_{t-1} (added to dc_prev), accumulating the
// peephole and cell-norm weight gradients. Written as flat passes over U without branches
// inside, so the compiler vectorises them; derivatives are taken from the activated values.
constexpr int64_t kCellScratchRows = 8;
template <typename T>
inline void cell_backward_row(const Params<T>& v, const Flags& fl, const GateOffsets& off,
                              const T* __restrict__ g, const T* __restrict__ cp,
                              const T* __restrict__ du, const T* __restrict__ dcn, T mean_c, T rstd_c,
                              T* __restrict__ dc_prev, T* __restrict__ dz, T* __restrict__ dp,
                              T* __restrict__ dnorm, T* __restrict__ scratch) {
  const int64_t U = v.U;
  T* c = scratch;          // C_t after the clip
  T* th = scratch + U;     // act(C_t) or act(LN(C_t) g_c + b_c)
  T* dC = scratch + 2 * U; // dL/dC_t
  T* d1 = scratch + 3 * U;
  T* d2 = scratch + 4 * U;
  T* d3 = scratch + 5 * U;
  T* chat = scratch + 6 * U;  // LN(C_t)
  T* cn = scratch + 7 * U;    // C_t before the clip
  const T* o = g + off.o;
  const T* f = g + off.f;
  const T* cc = g + off.c;
  if (fl.coupled) {
    for (int64_t j = 0; j < U; ++j) cn[j] = cell_update(f[j], cp[j], T(1) - f[j], cc[j]);
  } else {
    const T* i = g + off.i;
    for (int64_t j = 0; j < U; ++j) cn[j] = cell_update(f[j], cp[j], i[j], cc[j]);
  }
  if (fl.clip >= 0) {
    const T lo = T(-fl.clip), hi = T(fl.clip);
    for (int64_t j = 0; j < U; ++j) c[j] = std::min(std::max(cn[j], lo), hi);
  } else {
    std::copy(cn, cn + U, c);
  }
  if (fl.ln) {
    for (int64_t j = 0; j < U; ++j) {
      chat[j] = (c[j] - mean_c) * rstd_c;
      th[j] = chat[j] * v.gain_c[j] + v.shift_c[j];
    }
  } else {
    std::copy(c, c + U, th);
  }
  act_inplace(fl.act, th, U);
  // through h = o * th
  dact_arr(fl.act, th, d1, U);
  for (int64_t j = 0; j < U; ++j) dC[j] = du[j] * o[j] * d1[j];
  if (fl.ln) {
    for (int64_t j = 0; j < U; ++j) {
      dnorm[j] += dC[j] * chat[j];
      dnorm[U + j] += dC[j];
      dC[j] *= v.gain_c[j];
    }
    normalise_backward(dC, chat, rstd_c, dC, U);
  }
  dact_arr(fl.ract, o, d1, U);
  T* dzo = dz + off.o;
  for (int64_t j = 0; j < U; ++j) {
    dzo[j] = du[j] * th[j] * d1[j];
    dC[j] += dcn[j];
  }
  if (fl.peephole) {
    const T* po = v.peep + (fl.coupled ? U : 2 * U);
    for (int64_t j = 0; j < U; ++j) {
      dC[j] += dzo[j] * po[j];
      dp[2 * U + j] += dzo[j] * c[j];
    }
  }
  if (fl.clip >= 0) {  // no gradient where the clip was active (torch.clamp's convention)
    const T bound = T(fl.clip);
    for (int64_t j = 0; j < U; ++j) dC[j] = std::abs(cn[j]) > bound ? T(0) : dC[j];
  }
  // through C_t = f C_{t-1} + i C̃
  dact_arr(fl.act, cc, d2, U);
  dact_arr(fl.ract, f, d1, U);
  T* dzf = dz + off.f;
  T* dzc = dz + off.c;
  if (fl.coupled) {
    for (int64_t j = 0; j < U; ++j) {
      const T i = T(1) - f[j];
      dzc[j] = dC[j] * i * d2[j];
      dzf[j] = dC[j] * (cp[j] - cc[j]) * d1[j];
      d3[j] = dC[j] * f[j];
    }
  } else {
    const T* i = g + off.i;
    T* dzi = dz + off.i;
    dact_arr(fl.ract, i, d3, U);
    for (int64_t j = 0; j < U; ++j) {
      dzc[j] = dC[j] * i[j] * d2[j];
      dzf[j] = dC[j] * cp[j] * d1[j];
      dzi[j] = dC[j] * cc[j] * d3[j];
      d3[j] = dC[j] * f[j];
    }
  }
  if (fl.peephole) {
    const T* pf = v.peep + (fl.coupled ? 0 : U);
    for (int64_t j = 0; j < U; ++j) {
      d3[j] += dzf[j] * pf[j];
      dp[U + j] += dzf[j] * cp[j];
    }
    if (!fl.coupled) {
      const T* dzi = dz + off.i;
      for (int64_t j = 0; j < U; ++j) {
        d3[j] += dzi[j] * v.peep[j];
        dp[j] += dzi[j] * cp[j];
      }
    }
  }
  for (int64_t j = 0; j < U; ++j) dc_prev[j] += d3[j];
}

// BackwardPass::run for batch rows [b0, b1): each weight gradient's sum in its row b0
template <typename T>
void variant_backward_rows(const Params<T>& v, const Flags& fl, int64_t b0, int64_t b1, const T* dY,
                           const T* dhT, const T* dcT, const T* G, const T* Hp, const T* Cp,
                           const T* Ahat, const T* rstd_h, const T* mean_c, const T* rstd_c, const T* Xk,
                           const T* rstd_x, const T* mean_x, T* dXW, T* DA, T* Dr, T* dh0, T* dc0, T* dpeep,
                           T* dnorm_c, T* dgate_gain, T* dbias) {
  const int64_t nr = b1 - b0, Tn = v.Tn, U = v.U, Ps = v.Ps, GU = v.GU;
  const GateOffsets off(fl.coupled, U);
  std::vector<T> dh(nr * Ps, T(0)), dc(nr * U, T(0)), dprev(nr * Ps, T(0));
  if (dhT) std::copy(dhT + b0 * Ps, dhT + b1 * Ps, dh.begin());
  if (dcT) std::copy(dcT + b0 * U, dcT + b1 * U, dc.begin());
  std::vector<T> dr(nr * Ps), dhu(fl.proj ? nr * U : 0), dcn(nr * U), dz(GU), tmp(v.rd ? nr * Ps : 0);
  std::vector<T> scratch(kCellScratchRows * U);
  std::vector<char> active(nr);
  std::vector<uint8_t> keep_h(Ps), keep_c(U);
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    for (int64_t b = 0; b < nr; ++b) {
      const int64_t row = (b0 + b) * Tn + t, prow = (b0 + b) * Tn + s;
      T* pb = &dprev[b * Ps];
      const T* dy_out = fl.seq ? (dY ? dY + prow * Ps : nullptr) : (dY && s == Tn - 1 ? dY + (b0 + b) * Ps : nullptr);
      if (dy_out)
        for (int64_t j = 0; j < Ps; ++j) pb[j] += dy_out[j];
      active[b] = !v.mask || v.mask[row];
      if (!active[b]) {  // the state passed through; the output repeated the previous one (or was zero)
        if (fl.zero_out) std::fill(pb, pb + Ps, T(0));
        std::fill(dXW + row * GU, dXW + row * GU + GU, T(0));
        if (DA) std::fill(DA + row * GU, DA + row * GU + GU, T(0));
        if (Dr) std::fill(Dr + row * Ps, Dr + row * Ps + Ps, T(0));
        std::fill(&dr[b * Ps], &dr[b * Ps] + Ps, T(0));
        continue;
      }
      const int64_t zrow = (v.zoneout_offset + s) * v.B + b0 + b;  // (problem.Zoneout's numbering)
      const uint8_t* kh = zoneout_row(v.zoneout_seed, v.keep_h, zrow * Ps, Ps, 0, keep_h);
      const uint8_t* kc = zoneout_row(v.zoneout_seed, v.keep_c, zrow * U, U, 1, keep_c);
      T* dhb = &dh[b * Ps];
      T* dcb = &dc[b * U];
      for (int64_t j = 0; j < Ps; ++j) {
        const T g = dhb[j] + pb[j];
        const bool kept = kh && kh[j];
        dr[b * Ps + j] = kept ? T(0) : g;
        dhb[j] = kept ? g : T(0);  // what reaches h_{t-1} directly; the recurrent product adds to it
      }
      std::fill(pb, pb + Ps, T(0));
      for (int64_t j = 0; j < U; ++j) {
        const bool kept = kc && kc[j];
        dcn[b * U + j] = kept ? T(0) : dcb[j];
        dcb[j] = kept ? dcb[j] : T(0);
      }
      if (Dr) std::copy(&dr[b * Ps], &dr[b * Ps] + Ps, Dr + row * Ps);
    }
    const T* dhu_all = dr.data();
    if (fl.proj) {
      mm_set<T>(nr, U, Ps, dr.data(), Ps, v.PT, U, dhu.data(), U);
      dhu_all = dhu.data();
    }
    for (int64_t b = 0; b < nr; ++b) {
      const int64_t row = (b0 + b) * Tn + t;
      if (s > 0) {  // this row's buffers at the next step (the previous one in time)
        const int64_t next = row + (fl.backwards ? 1 : -1);
        prefetch_read(G + next * GU, GU);
        prefetch_read(Cp + next * U, U);
        if (fl.ln) {
          prefetch_read(Xk + next * GU, GU);
          prefetch_read(Ahat + next * GU, GU);
        }
        if (dY && fl.seq) prefetch_read(dY + ((b0 + b) * Tn + s - 1) * Ps, Ps);
      }
      if (!active[b]) continue;
      cell_backward_row<T>(v, fl, off, G + row * GU, Cp + row * U, dhu_all + b * U, &dcn[b * U],
                           fl.ln ? mean_c[row] : T(0), fl.ln ? rstd_c[row] : T(0), &dc[b * U], dz.data(),
                           dpeep ? dpeep + b0 * 3 * U : nullptr, fl.ln ? dnorm_c + b0 * 2 * U : nullptr,
                           scratch.data());
      T* dx = dXW + row * GU;
      T* db = dbias ? dbias + b0 * GU : nullptr;
      if (fl.ln) {  // z = LN(xk) g_x + LN(A) g_h + b
        gate_norms_backward(dz.data(), Xk + row * GU, mean_x[row], rstd_x[row], Ahat + row * GU, rstd_h[row],
                            v.gain_x, v.gain_h, dgate_gain + b0 * 2 * GU, dgate_gain + (b0 * 2 + 1) * GU, db, dx,
                            DA + row * GU, GU);
      } else {
        std::copy(dz.begin(), dz.end(), dx);
        if (db)
          for (int64_t j = 0; j < GU; ++j) db[j] += dz[j];
      }
    }
    // dh_{t-1} += dA @ R^T (rows strided by T*GU in dXW / DA)
    const T* dA = (fl.ln ? DA : dXW) + (b0 * Tn + t) * GU;
    if (v.rd) {
      for (int64_t g = 0; g < v.G; ++g) {
        mm_set<T>(nr, Ps, U, dA + g * U, Tn * GU, v.RT + g * U * Ps, Ps, tmp.data(), Ps);
        const T* m = v.rd + (g * v.B + b0) * Ps;
        for (int64_t j = 0; j < nr * Ps; ++j) dh[j] += tmp[j] * m[j];
      }
    } else {
      mm_acc<T>(nr, Ps, GU, dA, Tn * GU, v.RT, Ps, dh.data(), Ps);
    }
  }
  std::copy(dh.begin(), dh.end(), dh0 + b0 * Ps);
  std::copy(dc.begin(), dc.end(), dc0 + b0 * U);
}

}  // namespace

template <typename T>
ForwardPass<T>::ForwardPass(const Params<T>& params, const Flags& flags) : params_(params), flags_(flags) {}

template <typename T>
void ForwardPass<T>::run(T* xk, const T* h0, const T* c0, T* Y, T* hT, T* cT, const Saved<T>& saved, T* Htr,
                         T* Ctr) const {
  const Params<T>& v = params_;
  over_chunks(v.B, v.Ps * v.GU, [&](int64_t b0, int64_t b1) {
    variant_forward_rows<T>(v, flags_, b0, b1, xk, h0, c0, Y, hT, cT, saved.G, saved.Hp, saved.Cp, saved.Ahat,
                            saved.rstd_h, saved.mean_c, saved.rstd_c, saved.rstd_x, saved.mean_x, saved.Hu, Htr, Ctr);
  });
}

template <typename T>
BackwardPass<T>::BackwardPass(const Params<T>& params, const Flags& flags) : params_(params), flags_(flags) {}

template <typename T>
void BackwardPass<T>::run(const T* dY, const T* dhT, const T* dcT, const Saved<T>& saved,
                          const Gradients<T>& grads) const {
  const Params<T>& v = params_;
  const Flags& fl = flags_;
  const int64_t B = v.B, U = v.U, GU = v.GU;
  // Per-row weight-gradient sums: each chunk adds into its first batch row's (no races between
  // threads), summed below.
  std::vector<T> peep_rows(fl.peephole ? B * 3 * U : 0), norm_c_rows(fl.ln ? B * 2 * U : 0);
  std::vector<T> gain_rows(fl.ln ? B * 2 * GU : 0), bias_rows(v.bias ? B * GU : 0);  // gains: g_x, g_h
  std::vector<char> chunk_start(B, 0);
  auto data = [](std::vector<T>& rows) { return rows.empty() ? nullptr : rows.data(); };
  over_chunks(B, v.Ps * GU, [&](int64_t b0, int64_t b1) {
    if (b1 > b0) chunk_start[b0] = 1;  // (an empty batch runs one empty chunk)
    variant_backward_rows<T>(v, fl, b0, b1, dY, dhT, dcT, saved.G, saved.Hp, saved.Cp, saved.Ahat, saved.rstd_h,
                             saved.mean_c, saved.rstd_c, saved.Xk, saved.rstd_x, saved.mean_x, grads.dXW, grads.DA,
                             grads.Dr, grads.dh0, grads.dc0, data(peep_rows), data(norm_c_rows), data(gain_rows),
                             data(bias_rows));
  });
  // out [n] = columns [offset, offset + n) of the rows (`width` wide), summed over the chunks
  auto total = [&](const std::vector<T>& rows, int64_t width, int64_t offset, int64_t n, T* out) {
    std::fill(out, out + n, T(0));
    for (int64_t b = 0; b < B; ++b)
      if (chunk_start[b])
        for (int64_t j = 0; j < n; ++j) out[j] += rows[b * width + offset + j];
  };
  if (fl.peephole) {  // rows i f o, or f o when coupled
    if (fl.coupled) total(peep_rows, 3 * U, U, 2 * U, grads.dpeep);
    else total(peep_rows, 3 * U, 0, 3 * U, grads.dpeep);
  }
  if (fl.ln) {
    total(norm_c_rows, 2 * U, 0, U, grads.dgain_c);
    total(norm_c_rows, 2 * U, U, U, grads.dshift_c);
    total(gain_rows, 2 * GU, 0, 2 * GU, grads.dgate_gain);
  }
  if (v.bias) total(bias_rows, GU, 0, GU, grads.dbias);
}

template class ForwardPass<float>;
template class ForwardPass<double>;
template class BackwardPass<float>;
template class BackwardPass<double>;

}  // namespace variants
}  // namespace lstm_core
