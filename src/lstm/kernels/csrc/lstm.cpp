// The LSTM's recurrence over raw buffers (rnn.h: lstm::ForwardPass, lstm::BackwardPass): the plain
// cell and its variants (peephole, layer norm, projection, coupled gates, cell clip, zoneout) in
// one loop per pass, each thread running every step for its batch rows. The loops are templates
// on kPlain: the plain instantiation has every variant compiled out and the gate math fused in
// one vectorised pass (lstm_cell.h), the other reads the options at run time. Per step: one
// recurrent GEMM (MKL sgemm_/dgemm_ as ATen calls them, R packed once for big steps, a register
// loop for tiny batches), then each row's math. The backward is BPTT derived by hand over the
// saved gates and states, writing dL/dxk for the caller's weight-gradient GEMMs.

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "counter_hash.h"
#include "gemm.h"
#include "low_precision.h"
#include "lstm_cell.h"
#include "operand_right.h"
#include "rnn.h"
#include "row_layout.h"
#include "simd.h"
#include "threads.h"

namespace lstm_core {
namespace lstm {
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
  for (int64_t j = 0; j < n; ++j) keep[j] = counter_bits(seed, uint64_t((base + j) * 2 + stream)) < threshold;
}

// One stream's keep flags for one row and step, in `buffer`; nullptr when it has no zoneout.
inline const uint8_t* zoneout_row(uint64_t seed, uint64_t threshold, int64_t base, int64_t n, int stream,
                                  uint8_t* buffer) {
  if (!threshold) return nullptr;
  zoneout_flags(seed, threshold, base, n, stream, buffer);
  return buffer;
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

// The low-precision operands (Flags::operand) are float's only
template <typename T>
constexpr bool kHasOperands = std::is_same_v<T, float>;

// Whether a call has no variant at all (the plain instantiation runs it)
template <typename T>
inline bool is_plain(const Params<T>& v, const Flags& fl) {
  return !fl.coupled && !fl.peephole && !fl.ln && !fl.proj && fl.clip < 0 && !v.keep_h && !v.keep_c;
}

// The recurrent product of a chunk's first `rows` rows at one step: dst[rows, GU] (+)= h @ R, per
// gate times the recurrent dropout masks when there are any (hm: scratch [rows, Ps]; rounded, the
// product's operand, with low-precision operands); `accumulate` adds to dst.
template <typename T>
inline void recurrent_product(const Params<T>& v, const Flags& fl, const StepOperand<T>& rec, const Chunk& ch,
                              int64_t rows, const T* h, T* hm, T* dst, int64_t ld, bool accumulate) {
  const int64_t U = v.U, Ps = v.Ps, GU = v.GU;
  if (!v.rd) {
    if (accumulate) rec.acc(rows, h, Ps, dst, ld);
    else rec.set(rows, h, Ps, dst, ld);
    return;
  }
  for (int64_t g = 0; g < v.G; ++g) {
    for (int64_t b = 0; b < rows; ++b) {
      const T* m = v.rd + (g * v.B + ch.batch_row(b)) * Ps;
      for (int64_t j = 0; j < Ps; ++j) hm[b * Ps + j] = h[b * Ps + j] * m[j];
    }
    if constexpr (kHasOperands<T>)
      if (fl.operand) round_in_place(Operand(fl.operand), hm, rows * Ps);
    if (accumulate) mm_acc<T>(rows, U, Ps, hm, Ps, v.R + g * U, GU, dst + g * U, ld);
    else mm_set<T>(rows, U, Ps, hm, Ps, v.R + g * U, GU, dst + g * U, ld);
  }
}

// A chunk's rows of a [B, width] buffer: gathered into dense [count, width], or scattered back
template <typename T>
inline std::vector<T> chunk_rows(const T* all, const Chunk& ch, int64_t width) {
  std::vector<T> rows(ch.count * width);
  for (int64_t b = 0; b < ch.count; ++b)
    std::copy(all + ch.batch_row(b) * width, all + (ch.batch_row(b) + 1) * width, &rows[b * width]);
  return rows;
}

template <typename T>
inline void put_chunk_rows(const std::vector<T>& rows, const Chunk& ch, int64_t width, T* all) {
  for (int64_t b = 0; b < ch.count; ++b) std::copy(&rows[b * width], &rows[(b + 1) * width], all + ch.batch_row(b) * width);
}

// ForwardPass::run for one chunk of the batch rows (the pointers at row 0). Without layer norm the
// step's pre-activations are formed in xk's rows (h @ R added there) and become the gates in
// place; with it, z = LN(xk) g_x + LN(A) g_h + b goes to G (training) or a scratch buffer.
template <typename T, bool kPlain>
void forward_rows(const Params<T>& v, const Flags& fl, const RowLayout& L, const Chunk& ch, T* X, const T* h0,
                  const T* c0, T* Y, T* hT, T* cT, const Saved<T>& sv, T* Htr, T* Ctr) {
  const int64_t nr = ch.count, Tn = v.Tn, U = v.U, Ps = v.Ps, GU = v.GU, ld = L.chunk_stride(ch);
  const GateOffsets off(fl.coupled, U);
  const bool ln = !kPlain && fl.ln, proj = !kPlain && fl.proj, zoneout = !kPlain && (v.keep_h || v.keep_c);
  std::vector<T> h = chunk_rows(h0, ch, Ps), c = chunk_rows(c0, ch, U), prev(fl.seq ? 0 : nr * Ps, T(0));
  std::vector<T> A(ln && !fl.save ? nr * GU : 0), z_ln(ln && !fl.save ? nr * GU : 0), hm(v.rd ? nr * Ps : 0);
  std::vector<T> hu(kPlain ? 0 : nr * U), cnew(kPlain ? 0 : nr * U), r(proj ? nr * Ps : 0);
  std::vector<T> rs_a(ln ? nr : 0), mu_a(ln ? nr : 0), rs_x(ln ? nr : 0), mu_x(ln ? nr : 0);
  std::vector<T> no_bias(v.bias ? 0 : GU, T(0));
  const T* bias = v.bias ? v.bias : no_bias.data();
  // low-precision operands (the plain cell in float): h rounded at every step, its bits kept for
  // the products (where low_step_products, OperandRight's; else T's products of the same values) and
  // the buffers written in the operand type
  const Operand operand = Operand(fl.operand);
  std::vector<uint16_t> h_low(kPlain && kHasOperands<T> && fl.operand ? nr * Ps : 0);
  if constexpr (kHasOperands<T>)
    if (!h_low.empty()) round_to_operand(operand, h.data(), h_low.data(), nr * Ps);
  std::optional<OperandRight> low_rec;
  if (!h_low.empty() && v.R_low && low_step_products(operand, nr)) low_rec.emplace(operand, nr, GU, Ps, v.R_low, GU);
  const bool low_gemm = low_rec.has_value();
  // (not packed with recurrent dropout, a product per gate, nor when the low-precision products run)
  const StepOperand<T> rec(nr, GU, Ps, v.R, GU, v.rd || low_gemm ? 0 : Tn);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t na = L.taking(ch, s);  // the chunk's rows [0, na) take this step
    if (na == 0) break;                  // (packed: nor any later one)
    const int64_t first = L.row(ch.first, s);  // the chunk's first row at this step
    // the row's output and (Keras masking) its state: h and C already hold the new state of a kept
    // row, the old one of a masked row
    auto emit = [&](int64_t b, bool kept) {
      const int64_t prow = L.output_row(ch.batch_row(b), s);
      const T* hb = &h[b * Ps];
      if (fl.seq && v.Y_low) {  // (h_low holds h's bits)
        uint16_t* y = v.Y_low + prow * Ps;
        if (kept) std::copy(&h_low[b * Ps], &h_low[b * Ps] + Ps, y);
        else if (fl.zero_out || s == 0) std::fill(y, y + Ps, uint16_t(0));
        else std::copy(y - Ps, y, y);
      } else if (fl.seq) {
        T* y = Y + prow * Ps;
        if (kept) std::copy(hb, hb + Ps, y);
        else if (fl.zero_out || s == 0) std::fill(y, y + Ps, T(0));
        else std::copy(y - Ps, y, y);
      } else if (kept) {
        std::copy(hb, hb + Ps, &prev[b * Ps]);
      } else if (fl.zero_out) {
        std::fill(&prev[b * Ps], &prev[b * Ps] + Ps, T(0));
      }
    };
    // the new state of a variant's row from its h (hn) and C (cnew): zoneout, the trace, masking
    auto finish_row = [&](int64_t b, const T* hn, uint8_t* keep_h, uint8_t* keep_c) {
      const int64_t row = L.row(ch.batch_row(b), s), prow = L.output_row(ch.batch_row(b), s);
      T* hb = &h[b * Ps];
      T* cb = &c[b * U];
      const int64_t zrow = (v.zoneout_offset + s) * v.B + ch.batch_row(b);  // (problem.Zoneout's numbering)
      const uint8_t* kh = zoneout ? zoneout_row(v.zoneout_seed, v.keep_h, zrow * Ps, Ps, 0, keep_h) : nullptr;
      const uint8_t* kc = zoneout ? zoneout_row(v.zoneout_seed, v.keep_c, zrow * U, U, 1, keep_c) : nullptr;
      const T* cn = &cnew[b * U];
      if (Htr) {  // the step's own h and C (after zoneout), masked or not, as the reference's trace
        for (int64_t j = 0; j < Ps; ++j) Htr[prow * Ps + j] = (kh && kh[j]) ? hb[j] : hn[j];
        for (int64_t j = 0; j < U; ++j) Ctr[prow * U + j] = (kc && kc[j]) ? cb[j] : cn[j];
      }
      const bool kept = !v.mask || v.mask[row];
      if (kept) {
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
      }
      emit(b, kept);
    };
    // the recurrent product: into xk's rows, or with layer norm into A (in training straight into
    // Ahat, normalised there in place)
    T* A0 = nullptr;
    int64_t lda = GU;
    if (ln) {
      A0 = fl.save ? sv.Ahat + first * GU : A.data();
      lda = fl.save ? ld * GU : GU;
      recurrent_product(v, fl, rec, ch, na, h.data(), hm.data(), A0, lda, false);
      for (int64_t b = 0; b < na; ++b) {  // the rows' statistics first, apart: independent reductions the CPU overlaps
        rs_a[b] = row_stats(A0 + b * lda, GU, mu_a[b]);
        rs_x[b] = row_stats(X + (first + b * ld) * GU, GU, mu_x[b]);
      }
    } else if (!low_gemm) {
      recurrent_product(v, fl, rec, ch, na, h.data(), hm.data(), X + first * GU, ld * GU, true);
    } else if constexpr (kHasOperands<T>) {
      low_rec->mm(na, h_low.data(), Ps, true, X + first * GU, ld * GU);
    }
    over_rows(na, (kPlain ? 5 : 12) * U, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> keep_h(zoneout ? Ps : 0), keep_c(zoneout ? U : 0);
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = L.row(ch.batch_row(b), s);
        // this row's input at the next step (rows only written are left to the store buffer: write
        // prefetches held fill buffers and slowed the loop)
        if constexpr (kPlain) {
          // the row's buffers at the next step, for writing (measured on the plain loop: faster;
          // on the variants' loop they held fill buffers and slowed it)
          if (s + 1 < Tn) {
            const int64_t next = L.row(ch.batch_row(b), s + 1);
            prefetch_write(X + next * GU, GU);
            if (fl.save) {
              prefetch_write(sv.Hp + next * Ps, Ps);
              prefetch_write(sv.Cp + next * U, U);
            }
            if (fl.seq) prefetch_write(Y + L.output_row(ch.batch_row(b), s + 1) * Ps, Ps);
          }
        } else if (s + 1 < Tn) {
          prefetch_read(X + L.row(ch.batch_row(b), s + 1) * GU, GU);
        }
        T* xk = X + row * GU;
        T* z = !ln ? xk : fl.save ? sv.G + row * GU : &z_ln[b * GU];
        T* hb = &h[b * Ps];
        T* cb = &c[b * U];
        // the row's h_{t-1} and C_{t-1} saved here, between the rows' math, and its new state and
        // output written at the end of its row: all rows' at once, these were bursts of stores to
        // uncached lines the loop waited on
        if (fl.save) {
          if (v.Hp_low) std::copy(&h_low[b * Ps], &h_low[b * Ps] + Ps, v.Hp_low + row * Ps);
          else std::copy(hb, hb + Ps, sv.Hp + row * Ps);
          std::copy(cb, cb + U, sv.Cp + row * U);
        }
        if constexpr (kPlain) {
          for (int64_t j = 0; j < GU; ++j) z[j] += bias[j];
          const bool kept = !v.mask || v.mask[row];
          if (kept) {
            gate_row(z, cb, cb, hb, U, fl.act, fl.ract);
            if constexpr (kHasOperands<T>)
              if (!h_low.empty()) round_to_operand(operand, hb, &h_low[b * Ps], Ps);
          } else {  // the gates are still activated (the saved ones are read by traces)
            act_inplace(fl.ract, z, 2 * U);
            act_inplace(fl.act, z + 2 * U, U);
            act_inplace(fl.ract, z + 3 * U, U);
          }
          emit(b, kept);
          continue;
        }
        if (ln) {  // z = LN(xk) g_x + LN(A) g_h + b in one pass after the statistics
          gate_norms_forward(xk, mu_x[b], rs_x[b], A0 + b * lda, mu_a[b], rs_a[b], v.gain_x, v.gain_h, bias, z, GU);
          if (fl.save) {
            sv.rstd_h[row] = rs_a[b];
            sv.rstd_x[row] = rs_x[b];
            sv.mean_x[row] = mu_x[b];
          }
        } else {
          for (int64_t j = 0; j < GU; ++j) z[j] += bias[j];
        }
        if (fl.peephole) {  // rows: i f o, or f o when coupled
          const T* pf = v.peep + (fl.coupled ? 0 : U);
          for (int64_t j = 0; j < U; ++j) z[off.f + j] += pf[j] * cb[j];
          if (!fl.coupled)
            for (int64_t j = 0; j < U; ++j) z[off.i + j] += v.peep[j] * cb[j];
        }
        if (!fl.coupled) act_inplace(fl.ract, z + off.i, U);
        act_inplace(fl.ract, z + off.f, U);
        act_inplace(fl.act, z + off.c, U);
        T* cn = &cnew[b * U];
        for (int64_t j = 0; j < U; ++j) {
          const T f = z[off.f + j], i = fl.coupled ? T(1) - f : z[off.i + j];
          cn[j] = cell_update(f, cb[j], i, z[off.c + j]);
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
        if (ln) {  // out = LN(C) g_c + b_c
          T mean;
          const T rs = row_stats(out, U, mean);
          for (int64_t j = 0; j < U; ++j) out[j] = (out[j] - mean) * rs * v.gain_c[j] + v.shift_c[j];
          if (fl.save) {
            sv.mean_c[row] = mean;
            sv.rstd_c[row] = rs;
          }
        }
        act_inplace(fl.act, out, U);
        for (int64_t j = 0; j < U; ++j) out[j] *= z[off.o + j];
        // with low-precision operands h is rounded (or hu, the projection's operand, and h after it)
        if constexpr (kHasOperands<T>)
          if (fl.operand) round_in_place(operand, out, U);
        if (fl.save && proj) std::copy(out, out + U, sv.Hu + row * U);
        if (!proj) finish_row(b, out, keep_h.data(), keep_c.data());  // (with a projection: after its product, below)
      }
    });
    if (proj) {  // h = hu @ P for all rows, then their states
      mm_set<T>(na, Ps, U, hu.data(), U, v.P, Ps, r.data(), Ps);
      if constexpr (kHasOperands<T>)
        if (fl.operand) round_in_place(operand, r.data(), na * Ps);
      std::vector<uint8_t> keep_h(zoneout ? Ps : 0), keep_c(zoneout ? U : 0);
      for (int64_t b = 0; b < na; ++b) finish_row(b, &r[b * Ps], keep_h.data(), keep_c.data());
    }
  }
  put_chunk_rows(h, ch, Ps, hT);
  put_chunk_rows(c, ch, U, cT);
  if (!fl.seq) put_chunk_rows(prev, ch, Ps, Y);
}

// Inference over a large batch: no [B,T,4U] projection buffer at all (for big shapes it costs
// page faults and memory bandwidth, not FLOPs). Each step is one GEMM [x_t, h] @ [kernel; R]
// on a [B, D+U] buffer that holds x_t next to h; c and z are small per-call buffers.
template <typename T>
void forward_loop_xh(int64_t B, int64_t Tn, int64_t D, int64_t U, const T* x, const T* W, const T* bias,
                     const bool* keep, const Flags& fl, const T* h0, const T* c0, T* Y, T* hT, T* cT) {
  const int64_t GU = 4 * U, DU = D + U;
  std::vector<T> xh(B * DU), z(B * GU), c(B * U), ylast(fl.seq ? 0 : B * U, T(0));
  const StepOperand<T> w(B, GU, DU, W, GU, Tn);
  auto time_of = [&](int64_t s) { return fl.backwards ? Tn - 1 - s : s; };
  auto load_row = [&](int64_t b, int64_t t) {  // x_t next to h, the bias into z
    std::memcpy(xh.data() + b * DU, x + (b * Tn + t) * D, D * sizeof(T));
    if (bias) std::memcpy(z.data() + b * GU, bias, GU * sizeof(T));
    else std::fill(z.data() + b * GU, z.data() + (b + 1) * GU, T(0));
  };
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(xh.data() + b * DU + D, h0 + b * U, U * sizeof(T));
    std::memcpy(c.data() + b * U, c0 + b * U, U * sizeof(T));
    if (Tn > 0) load_row(b, time_of(0));
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_of(s);
    w.acc(xh.data(), DU, z.data(), GU);
    // the rows' gate math, then their next step's inputs: one pass over the threads per step
    // (the rows of a call that runs on MKL's threads would otherwise wait on one thread)
    over_rows(B, 5 * U + DU, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const bool kept = keep == nullptr || keep[b * Tn + t];
        T* yrow = fl.seq ? Y + (b * Tn + s) * U : ylast.data() + b * U;
        T* hrow = xh.data() + b * DU + D;
        if (kept) {
          gate_row(z.data() + b * GU, c.data() + b * U, c.data() + b * U, hrow, U, fl.act, fl.ract);
          std::memcpy(yrow, hrow, U * sizeof(T));
        } else if (fl.seq) {
          if (fl.zero_out || s == 0) std::memset(yrow, 0, U * sizeof(T));
          else std::memcpy(yrow, Y + (b * Tn + s - 1) * U, U * sizeof(T));
        } else if (fl.zero_out) {
          std::memset(yrow, 0, U * sizeof(T));
        }
        if (s + 1 < Tn) load_row(b, time_of(s + 1));
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(hT + b * U, xh.data() + b * DU + D, U * sizeof(T));
    std::memcpy(cT + b * U, c.data() + b * U, U * sizeof(T));
  }
  if (!fl.seq && Tn > 0) std::memcpy(Y, ylast.data(), B * U * sizeof(T));
}

// forward_loop_xh with low-precision operands (Flags::operand): x, W and h as its bits, each step
// one MKL GEMM [x_t, h] @ W accumulated in float32; C and the gate math in float32, h rounded at
// every step. Y_low: [B,T,U] the outputs with seq; else Y: [B,U] float.
void forward_loop_xh_low(int64_t B, int64_t Tn, int64_t D, int64_t U, const uint16_t* x, const uint16_t* W,
                         const float* bias, const bool* keep, const Flags& fl, const float* h0, const float* c0,
                         uint16_t* Y_low, float* Y, float* hT, float* cT) {
  const int64_t GU = 4 * U, DU = D + U;
  const Operand operand = Operand(fl.operand);
  const OperandRight w(operand, B, GU, DU, W, GU);
  std::vector<uint16_t> xh(B * DU);
  std::vector<float> z(B * GU), c(c0, c0 + B * U), h(h0, h0 + B * U), ylast(fl.seq ? 0 : B * U, 0.0f);
  auto time_of = [&](int64_t s) { return fl.backwards ? Tn - 1 - s : s; };
  auto load_row = [&](int64_t b, int64_t t) { std::copy(x + (b * Tn + t) * D, x + (b * Tn + t + 1) * D, &xh[b * DU]); };
  for (int64_t b = 0; b < B; ++b) {
    round_to_operand(operand, &h[b * U], &xh[b * DU + D], U);
    load_row(b, time_of(0));
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_of(s);
    w.mm(xh.data(), DU, false, z.data(), GU);
    over_rows(B, 5 * U + DU, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const bool kept = keep == nullptr || keep[b * Tn + t];
        uint16_t* h_bits = &xh[b * DU + D];
        float* zr = &z[b * GU];
        if (bias)
          for (int64_t j = 0; j < GU; ++j) zr[j] += bias[j];
        if (kept) {
          gate_row(zr, &c[b * U], &c[b * U], &h[b * U], U, fl.act, fl.ract);
          round_to_operand(operand, &h[b * U], h_bits, U);
        }
        if (fl.seq) {
          uint16_t* y = Y_low + (b * Tn + s) * U;
          if (kept) std::copy(h_bits, h_bits + U, y);
          else if (fl.zero_out || s == 0) std::fill(y, y + U, uint16_t(0));
          else std::copy(y - U, y, y);
        } else if (kept) {
          std::copy(&h[b * U], &h[b * U] + U, &ylast[b * U]);
        } else if (fl.zero_out) {
          std::fill(&ylast[b * U], &ylast[b * U] + U, 0.0f);
        }
        if (s + 1 < Tn) load_row(b, time_of(s + 1));
      }
    });
  }
  std::copy(h.begin(), h.end(), hT);
  std::copy(c.begin(), c.end(), cT);
  if (!fl.seq) std::copy(ylast.begin(), ylast.end(), Y);
}

// The plain cell's part of one row's backward (sigmoid gates and tanh: restrict, so vectorised
// without alias checks): dz [4U] from the gates g, C_{t-1} (cp), dL/dC_t (dctv), dL/dh_t (dhn)
// and tanh(C_t) (tc); dL/dC_{t-1} into dcb.
template <typename T>
inline void plain_row_sigmoid_tanh(const T* __restrict__ g, const T* __restrict__ cp, const T* __restrict__ dctv,
                                   const T* __restrict__ dhn, const T* __restrict__ tc, T* __restrict__ d,
                                   T* __restrict__ dcb, int64_t U) {
  const T* __restrict__ gi = g;
  const T* __restrict__ gf = g + U;
  const T* __restrict__ gg = g + 2 * U;
  const T* __restrict__ go = g + 3 * U;
  T* __restrict__ d0 = d;
  T* __restrict__ d1 = d + U;
  T* __restrict__ d2 = d + 2 * U;
  T* __restrict__ d3 = d + 3 * U;
  for (int64_t j = 0; j < U; ++j) {
    const T dct = dctv[j], i = gi[j], f = gf[j], gv = gg[j], o = go[j];
    d0[j] = dct * gv * (i * (T(1) - i));
    d1[j] = dct * cp[j] * (f * (T(1) - f));
    d2[j] = dct * i * (T(1) - gv * gv);
    d3[j] = dhn[j] * tc[j] * (o * (T(1) - o));
    dcb[j] = dct * f;
  }
}

// The plain cell's backward of one row: dz [4U] from dL/dh_t (dhn), the gates g and C_{t-1} (cp);
// dcb: dL/dC_t in, dL/dC_{t-1} out. tc, d1: scratch [U].
template <typename T>
inline void plain_row_backward(const Flags& fl, const T* g, const T* cp, const T* dhn, T* dcb, T* dz, T* tc, T* d1,
                               int64_t U) {
  const T* gi = g;
  const T* gf = g + U;
  const T* gg = g + 2 * U;
  const T* go = g + 3 * U;
  for (int64_t j = 0; j < U; ++j) tc[j] = gf[j] * cp[j] + gi[j] * gg[j];  // (as gate_row forms C)
  act_inplace(fl.act, tc, U);
  dact_arr(fl.act, tc, d1, U);
  for (int64_t j = 0; j < U; ++j) d1[j] = dcb[j] + dhn[j] * go[j] * d1[j];  // dL/dC_t in all
  if (fl.ract == 1 && fl.act == 0) {
    plain_row_sigmoid_tanh(g, cp, d1, dhn, tc, dz, dcb, U);
    return;
  }
  for (int64_t j = 0; j < U; ++j) {
    const T dct = d1[j], i = gi[j], f = gf[j], gv = gg[j], o = go[j];
    dz[j] = dct * gv * dact(fl.ract, i);
    dz[U + j] = dct * cp[j] * dact(fl.ract, f);
    dz[2 * U + j] = dct * i * dact(fl.act, gv);
    dz[3 * U + j] = dhn[j] * tc[j] * dact(fl.ract, o);
    dcb[j] = dct * f;
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

// BackwardPass::run for one chunk of the batch rows. The weight-gradient sums go to rows of the
// *_rows buffers: the variants' to the chunk's first row (its rows run on one thread), the plain
// cell's bias to each batch row's (its rows may be split over the threads at each step).
template <typename T, bool kPlain>
void backward_rows(const Params<T>& v, const Flags& fl, const RowLayout& L, const Chunk& ch, const T* dY,
                   const T* dhT, const T* dcT, const Saved<T>& sv, const Gradients<T>& gr, T* peep_rows,
                   T* norm_c_rows, T* gain_rows, T* bias_rows) {
  const int64_t nr = ch.count, Tn = v.Tn, U = v.U, Ps = v.Ps, GU = v.GU, ld = L.chunk_stride(ch);
  const int64_t b0 = ch.first;  // (the chunk's sums go to its first row's)
  const GateOffsets off(fl.coupled, U);
  const bool ln = !kPlain && fl.ln, proj = !kPlain && fl.proj, zoneout = !kPlain && (v.keep_h || v.keep_c);
  std::vector<T> dh(nr * Ps, T(0)), dc(nr * U, T(0)), dprev(nr * Ps, T(0));
  if (dhT) dh = chunk_rows(dhT, ch, Ps);
  if (dcT) dc = chunk_rows(dcT, ch, U);
  std::vector<T> dr(kPlain ? 0 : nr * Ps), dhu(proj ? nr * U : 0), dcn(kPlain ? 0 : nr * U), tmp(v.rd ? nr * Ps : 0);
  std::vector<char> active(nr);
  // low-precision operands (the plain cell in float): each step's dz rounded, into dXW_low, for
  // its products (with R^T here, the weight gradients after)
  const Operand operand = Operand(fl.operand);
  uint16_t* dz_low = kPlain && kHasOperands<T> && fl.operand ? v.dXW_low : nullptr;
  // (without low_step_products: the product with R^T takes float's, on dz unrounded)
  std::optional<OperandRight> low_rec_t;
  if (dz_low && low_step_products(operand, nr)) low_rec_t.emplace(operand, nr, Ps, GU, v.RT_low, Ps);
  const bool low_gemm = low_rec_t.has_value();
  // (not packed with recurrent dropout, a product per gate, nor when the low-precision products run)
  const StepOperand<T> rec_t(nr, Ps, GU, v.RT, Ps, v.rd || low_gemm ? 0 : Tn);
  std::vector<T> dz_step(dz_low && !low_gemm ? nr * GU : 0);
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t na = L.taking(ch, s);  // the chunk's rows [0, na) took this step
    if (na == 0) continue;               // (packed: the chunk's rows all ended before it)
    const int64_t first = L.row(ch.first, s);  // the chunk's first row at this step
    // the row's output gradient at step s: with return_sequences the step's, else the last step's
    // (packed: the caller gives the last output's gradient as dhT's)
    auto output_gradient = [&](int64_t b) -> const T* {
      if (!dY) return nullptr;
      if (fl.seq) return dY + L.output_row(ch.batch_row(b), s) * Ps;
      return s == Tn - 1 && !L.packed() ? dY + ch.batch_row(b) * Ps : nullptr;
    };
    // dL/d(the row's output) into dprev; whether the step counts for the row; a masked row's
    // state passed through and its output repeated the previous one (or was zero)
    auto take_output_gradient = [&](int64_t b) {
      const int64_t row = L.row(ch.batch_row(b), s);
      T* pb = &dprev[b * Ps];
      const T* dy = output_gradient(b);
      if (dy)
        for (int64_t j = 0; j < Ps; ++j) pb[j] += dy[j];
      active[b] = !v.mask || v.mask[row];
      if (!active[b]) {
        if (fl.zero_out) std::fill(pb, pb + Ps, T(0));
        if (v.dXW_low) std::fill(v.dXW_low + row * GU, v.dXW_low + row * GU + GU, uint16_t(0));
        else std::fill(gr.dXW + row * GU, gr.dXW + row * GU + GU, T(0));
        if (ln) std::fill(gr.DA + row * GU, gr.DA + row * GU + GU, T(0));
        if (proj) std::fill(gr.Dr + row * Ps, gr.Dr + row * Ps + Ps, T(0));
      }
      return active[b];
    };
    if constexpr (kPlain) {
      const bool in_place = gr.dXW == sv.G;  // (then dz goes through a scratch row: the row math reads G)
      over_rows(na, 8 * U, [&](int64_t r0, int64_t r1) {
        std::vector<T> dhn(U), tc(U), d1(U), dz_row(in_place || low_gemm ? GU : 0);
        for (int64_t b = r0; b < r1; ++b) {
          const int64_t row = L.row(ch.batch_row(b), s);
          if (s > 0) {  // this row's buffers at the next step (the previous one in time)
            const int64_t next = L.row(ch.batch_row(b), s - 1);
            prefetch_read(sv.G + next * GU, GU);
            prefetch_read(sv.Cp + next * U, U);
            prefetch_write(gr.dXW + next * GU, GU);
            if (dY && fl.seq) prefetch_read(dY + L.output_row(ch.batch_row(b), s - 1) * Ps, Ps);
          }
          T* dhb = &dh[b * Ps];
          if (v.mask) {  // (the output gradients of masked steps wait in dprev)
            if (!take_output_gradient(b)) {
              if (!dz_step.empty()) std::fill(&dz_step[b * GU], &dz_step[b * GU] + GU, T(0));
              continue;
            }
            T* pb = &dprev[b * Ps];
            for (int64_t j = 0; j < U; ++j) {
              dhn[j] = dhb[j] + pb[j];
              pb[j] = T(0);
            }
          } else {
            const T* dy = output_gradient(b);
            if (dy) {
              for (int64_t j = 0; j < U; ++j) dhn[j] = dhb[j] + dy[j];
            } else {
              std::copy(dhb, dhb + U, dhn.data());
            }
          }
          std::fill(dhb, dhb + U, T(0));  // (the recurrent product below refills it)
          T* dx = dz_low ? nullptr : gr.dXW + row * GU;
          T* dz = dx && !in_place ? dx : !dz_step.empty() ? &dz_step[b * GU] : dz_row.data();
          plain_row_backward(fl, sv.G + row * GU, sv.Cp + row * U, dhn.data(), &dc[b * U], dz, tc.data(), d1.data(),
                             U);
          if (dx && in_place) std::copy(dz, dz + GU, dx);
          if constexpr (kHasOperands<T>)
            if (dz_low)
              for (int64_t j = 0; j < GU; ++j) dz_low[row * GU + j] = to_operand(operand, dz[j]);
          if (bias_rows) {
            T* dbr = bias_rows + ch.batch_row(b) * GU;
            for (int64_t j = 0; j < GU; ++j) dbr[j] += dz[j];
          }
        }
      });
    } else {
      std::vector<uint8_t> keep_h(zoneout ? Ps : 0), keep_c(zoneout ? U : 0);
      for (int64_t b = 0; b < na; ++b) {
        if (!take_output_gradient(b)) {
          std::fill(&dr[b * Ps], &dr[b * Ps] + Ps, T(0));
          continue;
        }
        const int64_t row = L.row(ch.batch_row(b), s);
        const int64_t zrow = (v.zoneout_offset + s) * v.B + ch.batch_row(b);  // (problem.Zoneout's numbering)
        const uint8_t* kh = zoneout ? zoneout_row(v.zoneout_seed, v.keep_h, zrow * Ps, Ps, 0, keep_h.data()) : nullptr;
        const uint8_t* kc = zoneout ? zoneout_row(v.zoneout_seed, v.keep_c, zrow * U, U, 1, keep_c.data()) : nullptr;
        T* pb = &dprev[b * Ps];
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
        if (proj) std::copy(&dr[b * Ps], &dr[b * Ps] + Ps, gr.Dr + row * Ps);
      }
      const T* dhu_all = dr.data();
      if (proj) {
        mm_set<T>(na, U, Ps, dr.data(), Ps, v.PT, U, dhu.data(), U);
        dhu_all = dhu.data();
      }
      std::vector<T> dz(GU), scratch(kCellScratchRows * U);
      for (int64_t b = 0; b < na; ++b) {
        const int64_t row = L.row(ch.batch_row(b), s);
        if (s > 0) {  // this row's buffers at the next step (the previous one in time)
          const int64_t next = L.row(ch.batch_row(b), s - 1);
          prefetch_read(sv.G + next * GU, GU);
          prefetch_read(sv.Cp + next * U, U);
          if (ln) {
            prefetch_read(sv.Xk + next * GU, GU);
            prefetch_read(sv.Ahat + next * GU, GU);
          }
          if (dY && fl.seq) prefetch_read(dY + L.output_row(ch.batch_row(b), s - 1) * Ps, Ps);
        }
        if (!active[b]) continue;
        cell_backward_row<T>(v, fl, off, sv.G + row * GU, sv.Cp + row * U, dhu_all + b * U, &dcn[b * U],
                             ln ? sv.mean_c[row] : T(0), ln ? sv.rstd_c[row] : T(0), &dc[b * U], dz.data(),
                             peep_rows ? peep_rows + b0 * 3 * U : nullptr, ln ? norm_c_rows + b0 * 2 * U : nullptr,
                             scratch.data());
        T* dx = gr.dXW + row * GU;
        T* db = bias_rows ? bias_rows + b0 * GU : nullptr;
        if (ln) {  // z = LN(xk) g_x + LN(A) g_h + b
          gate_norms_backward(dz.data(), sv.Xk + row * GU, sv.mean_x[row], sv.rstd_x[row], sv.Ahat + row * GU,
                              sv.rstd_h[row], v.gain_x, v.gain_h, gain_rows + b0 * 2 * GU,
                              gain_rows + (b0 * 2 + 1) * GU, db, dx, gr.DA + row * GU, GU);
        } else {
          std::copy(dz.begin(), dz.end(), dx);
          if (db)
            for (int64_t j = 0; j < GU; ++j) db[j] += dz[j];
        }
      }
    }
    // dh_{t-1} += dA @ R^T (a step's rows of the chunk ld apart in dXW / DA), per gate times the
    // recurrent dropout masks
    const T* dA = dz_low ? nullptr : (ln ? gr.DA : gr.dXW) + first * GU;
    if (v.rd) {
      for (int64_t g = 0; g < v.G; ++g) {
        mm_set<T>(na, Ps, U, dA + g * U, ld * GU, v.RT + g * U * Ps, Ps, tmp.data(), Ps);
        for (int64_t b = 0; b < na; ++b) {
          const T* m = v.rd + (g * v.B + ch.batch_row(b)) * Ps;
          for (int64_t j = 0; j < Ps; ++j) dh[b * Ps + j] += tmp[b * Ps + j] * m[j];
        }
      }
    } else if (!dz_low) {
      rec_t.acc(na, dA, ld * GU, dh.data(), Ps);
    } else if (!low_gemm) {
      rec_t.acc(na, dz_step.data(), GU, dh.data(), Ps);
    } else if constexpr (kHasOperands<T>) {
      low_rec_t->mm(na, dz_low + first * GU, ld * GU, true, dh.data(), Ps);
    }
  }
  put_chunk_rows(dh, ch, Ps, gr.dh0);
  put_chunk_rows(dc, ch, U, gr.dc0);
}

}  // namespace

template <typename T>
ForwardPass<T>::ForwardPass(const Params<T>& params, const Flags& flags) : params_(params), flags_(flags) {}

template <typename T>
void ForwardPass<T>::run(T* xk, const T* h0, const T* c0, T* Y, T* hT, T* cT, const Saved<T>& saved, T* Htr,
                         T* Ctr) const {
  const Params<T>& v = params_;
  const bool plain = is_plain(v, flags_) && !Htr;
  const RowLayout L(v.batch_sizes, v.B, v.Tn, flags_.backwards);
  const int64_t chunks = chunk_count(v.B, v.Ps * v.GU);
  run_chunks(chunks, [&](int64_t c) {
    const Chunk ch = L.chunk(c, chunks);
    if (plain) forward_rows<T, true>(v, flags_, L, ch, xk, h0, c0, Y, hT, cT, saved, Htr, Ctr);
    else forward_rows<T, false>(v, flags_, L, ch, xk, h0, c0, Y, hT, cT, saved, Htr, Ctr);
  });
}

template <typename T>
void ForwardPass<T>::run_fused_input(int64_t input_size, const T* x, const T* W, const T* h0, const T* c0, T* Y,
                                     T* hT, T* cT) const {
  const Params<T>& v = params_;
  const int64_t D = input_size, U = v.U, Tn = v.Tn;
  over_chunks(v.B, (D + U) * 4 * U, [&](int64_t b0, int64_t b1) {
    forward_loop_xh<T>(b1 - b0, Tn, D, U, x + b0 * Tn * D, W, v.bias, v.mask ? v.mask + b0 * Tn : nullptr, flags_,
                       h0 + b0 * U, c0 + b0 * U, Y + b0 * (flags_.seq ? Tn : 1) * U, hT + b0 * U, cT + b0 * U);
  });
}

template <typename T>
void ForwardPass<T>::run_fused_input_low(int64_t input_size, const uint16_t* x, const uint16_t* W, const T* h0,
                                         const T* c0, T* Y, T* hT, T* cT) const {
  if constexpr (kHasOperands<T>) {
    const Params<T>& v = params_;
    const int64_t D = input_size, U = v.U, Tn = v.Tn;
    over_chunks(v.B, (D + U) * 4 * U, [&](int64_t b0, int64_t b1) {
      forward_loop_xh_low(b1 - b0, Tn, D, U, x + b0 * Tn * D, W, v.bias, v.mask ? v.mask + b0 * Tn : nullptr, flags_,
                          h0 + b0 * U, c0 + b0 * U, v.Y_low ? v.Y_low + b0 * Tn * U : nullptr,
                          flags_.seq ? nullptr : Y + b0 * U, hT + b0 * U, cT + b0 * U);
    });
  }
}

template <typename T>
BackwardPass<T>::BackwardPass(const Params<T>& params, const Flags& flags) : params_(params), flags_(flags) {}

template <typename T>
void BackwardPass<T>::run(const T* dY, const T* dhT, const T* dcT, const Saved<T>& saved,
                          const Gradients<T>& grads) const {
  const Params<T>& v = params_;
  const Flags& fl = flags_;
  const int64_t B = v.B, U = v.U, GU = v.GU;
  const bool plain = is_plain(v, fl);
  // the weight-gradient sums of the rows or chunks (backward_rows), summed below
  std::vector<T> peep_rows(fl.peephole ? B * 3 * U : 0), norm_c_rows(fl.ln ? B * 2 * U : 0);
  std::vector<T> gain_rows(fl.ln ? B * 2 * GU : 0), bias_rows(grads.dbias ? B * GU : 0);  // gains: g_x, g_h
  std::vector<char> chunk_start(B, 0);
  auto data = [](std::vector<T>& rows) { return rows.empty() ? nullptr : rows.data(); };
  const RowLayout L(v.batch_sizes, B, v.Tn, fl.backwards);
  const int64_t chunks = chunk_count(B, v.Ps * GU);
  run_chunks(chunks, [&](int64_t c) {
    const Chunk ch = L.chunk(c, chunks);
    if (ch.count > 0) chunk_start[ch.first] = 1;  // (an empty batch runs one empty chunk)
    if (plain)
      backward_rows<T, true>(v, fl, L, ch, dY, dhT, dcT, saved, grads, nullptr, nullptr, nullptr, data(bias_rows));
    else
      backward_rows<T, false>(v, fl, L, ch, dY, dhT, dcT, saved, grads, data(peep_rows), data(norm_c_rows),
                              data(gain_rows), data(bias_rows));
  });
  // out [n] = columns [offset, offset + n) of the rows (`width` wide) that hold sums
  auto total = [&](const std::vector<T>& rows, int64_t width, int64_t offset, int64_t n, bool every_row, T* out) {
    std::fill(out, out + n, T(0));
    for (int64_t b = 0; b < B; ++b)
      if (every_row || chunk_start[b])
        for (int64_t j = 0; j < n; ++j) out[j] += rows[b * width + offset + j];
  };
  if (fl.peephole) {  // rows i f o, or f o when coupled
    if (fl.coupled) total(peep_rows, 3 * U, U, 2 * U, false, grads.dpeep);
    else total(peep_rows, 3 * U, 0, 3 * U, false, grads.dpeep);
  }
  if (fl.ln) {
    total(norm_c_rows, 2 * U, 0, U, false, grads.dgain_c);
    total(norm_c_rows, 2 * U, U, U, false, grads.dshift_c);
    total(gain_rows, 2 * GU, 0, 2 * GU, false, grads.dgate_gain);
  }
  if (grads.dbias) total(bias_rows, GU, 0, GU, plain, grads.dbias);
}

template class ForwardPass<float>;
template class ForwardPass<double>;
template class BackwardPass<float>;
template class BackwardPass<double>;

}  // namespace lstm
}  // namespace lstm_core
