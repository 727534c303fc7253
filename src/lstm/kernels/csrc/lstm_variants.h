// The LSTM variants' recurrence (peephole, layer norm, projection, coupled gates, cell clip,
// zoneout), fused: included by lstm_cpu.cpp, whose helpers (activations, products, chunking) it
// uses. The maths is reference.py's; the caller (fused_variants.py) does the GEMMs over all steps
// with torch: xk = x @ kernel (dropout masks first), the DropConnect mask on the recurrent
// kernel, and the weight gradients.
//
// Per step, for the rows of one chunk (each thread runs the whole sequence for its rows):
//   xw = LN(xk) g_x + b or xk + b (b: the bias, forget_bias included), A = h_{t-1} @ R (per gate
//   when recurrent dropout masks h), LN(A) g_h with layer norm, z = xw + A, peepholes, gates,
//   C = clip(f C_{t-1} + i C̃), o, hu = o tanh(C or LN(C) g_c + b_c), h = hu @ P (projection),
//   zoneout, Keras masking.
// Saved (training), indexed by time like xk: activated gates G, h_{t-1} (Hp), C_{t-1} (Cp),
// hu (Hu), and for the layer norms LN(A) (Ahat), each row's 1/std
// (rstd_h, rstd_c, rstd_x) and the means of C and xk (mean_c, mean_x): LN(C) and LN(xk) are
// recomputed in the backward from C and xk (which is saved as it is): less memory traffic than
// writing them in the forward and reading them back.
// The backward returns dxk, DA (dz through the recurrent layer norm; dz = dxk without it) and dr
// (dh before the projection) per step, from which the caller forms dkernel = x^T dxk,
// dR = Hp^T DA and dP = Hu^T dr, and the sums of the per-row gradients of b, g_x, g_h.

namespace {

struct VariantFlags {
  bool backwards, zero_out, seq, coupled, peephole, ln, proj, save;
  int act, ract;
  double clip;  // < 0: no clip
};

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

struct Zoneout {  // the seed, the step offset and the two keep thresholds (0: off) of problem.Zoneout
  int64_t seed, offset, keep_h, keep_c;
};

template <typename T>
struct VariantTensors {  // raw pointers of one call; nullptr where a variant is off
  const T *gain_x, *bias, *R, *RT, *rd, *peep, *gain_h, *gain_c, *shift_c, *P, *PT;
  const bool* mask;
  uint64_t zoneout_seed, keep_h, keep_c;  // zoneout: keep thresholds of 24-bit uniforms (0: off)
  int64_t zoneout_offset;  // the global processing step of the call's first step
  int64_t B, Tn, U, Ps, GU, G;  // Ps: size of h (projection or U); G: gate blocks (3 coupled, 4)
};

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

template <typename T>
void variant_forward_rows(const VariantTensors<T>& v, const VariantFlags& fl, int64_t b0, int64_t b1, T* X,
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
inline void cell_backward_row(const VariantTensors<T>& v, const VariantFlags& fl, const GateOffsets& off,
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

template <typename T>
void variant_backward_rows(const VariantTensors<T>& v, const VariantFlags& fl, int64_t b0, int64_t b1, const T* dY,
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

template <typename T>
VariantTensors<T> variant_tensors(const torch::Tensor& xk, const torch::Tensor& gate_gain, const torch::Tensor& bias,
                                  const torch::Tensor& R, const torch::Tensor& RT,
                                  const torch::Tensor& rd, const torch::Tensor& peep, const torch::Tensor& gain_c,
                                  const torch::Tensor& shift_c, const torch::Tensor& P,
                                  const torch::Tensor& PT, const Zoneout& zoneout, const torch::Tensor& mask,
                                  bool coupled) {
  auto ptr = [](const torch::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
  VariantTensors<T> v;
  v.gain_x = ptr(gate_gain);
  v.gain_h = v.gain_x ? v.gain_x + xk.size(2) : nullptr;
  v.bias = ptr(bias);
  v.R = ptr(R);
  v.RT = ptr(RT);
  v.rd = ptr(rd);
  v.peep = ptr(peep);
  v.gain_c = ptr(gain_c);
  v.shift_c = ptr(shift_c);
  v.P = ptr(P);
  v.PT = ptr(PT);
  v.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  v.zoneout_seed = uint64_t(zoneout.seed);
  v.zoneout_offset = zoneout.offset;
  v.keep_h = uint64_t(zoneout.keep_h);
  v.keep_c = uint64_t(zoneout.keep_c);
  v.B = xk.size(0);
  v.Tn = xk.size(1);
  v.GU = xk.size(2);
  v.G = coupled ? 3 : 4;
  v.U = v.GU / v.G;
  v.Ps = R.size(0);
  return v;
}

inline torch::Tensor contiguous_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->contiguous() : torch::Tensor();
}

inline torch::Tensor bool_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->to(torch::kBool).contiguous() : torch::Tensor();
}

}  // namespace

// xk = x @ kernel [B,T,GU] (time order, contiguous), gate_gain [2,GU] (layer norm: g_x, g_h),
// bias [GU] (forget_bias included), R [Ps,GU]; see the top of this file. Returns Y, hT, cT and,
// with save, G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, xk itself, rstd_x, mean_x (undefined
// where unused) and, with trace (which implies save), each step's h and C after zoneout [B,T,*] in
// processing order.
std::vector<torch::Tensor> variant_forward(torch::Tensor xk, c10::optional<torch::Tensor> gate_gain_o,
                                           c10::optional<torch::Tensor> bias_o, torch::Tensor R,
                                           c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
                                           c10::optional<torch::Tensor> gain_c_o,
                                           c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
                                           int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h,
                                           int64_t keep_c,
                                           c10::optional<torch::Tensor> mask_o,
                                           torch::Tensor h0, torch::Tensor c0, bool backwards, bool zero_out, bool seq,
                                           bool coupled, int64_t act, int64_t ract, double clip, bool save,
                                           bool trace) {
  at::NoGradGuard no_grad;
  save = save || trace;
  TORCH_CHECK(xk.is_contiguous(), "variant_forward: xk must be contiguous");
  R = R.contiguous();
  h0 = h0.contiguous();
  c0 = c0.contiguous();
  auto rd = contiguous_or_none(rd_o), peep = contiguous_or_none(peep_o), gain_c = contiguous_or_none(gain_c_o),
       shift_c = contiguous_or_none(shift_c_o), P = contiguous_or_none(P_o),
       gate_gain = contiguous_or_none(gate_gain_o), bias = contiguous_or_none(bias_o), mask = bool_or_none(mask_o);
  VariantFlags fl{backwards, zero_out, seq, coupled, peep.defined(), gate_gain.defined(), P.defined(), save,
                  static_cast<int>(act), static_cast<int>(ract), clip};
  const int64_t B = xk.size(0), Tn = xk.size(1), GU = xk.size(2), Ps = R.size(0), U = GU / (coupled ? 3 : 4);
  auto opts = xk.options();
  auto Y = seq ? buffer_pool::empty({B, Tn, Ps}, opts) : torch::empty({B, Ps}, opts);  // (every row is written)
  auto hT = torch::empty({B, Ps}, opts), cT = torch::empty({B, U}, opts);
  torch::Tensor G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x, Htr, Ctr;
  if (trace) {
    Htr = buffer_pool::empty({B, Tn, Ps}, opts);
    Ctr = buffer_pool::empty({B, Tn, U}, opts);
  }
  if (save) {
    G = buffer_pool::empty({B, Tn, GU}, opts);
    Hp = buffer_pool::empty({B, Tn, Ps}, opts);
    Cp = buffer_pool::empty({B, Tn, U}, opts);
    if (fl.ln) {
      Ahat = buffer_pool::empty({B, Tn, GU}, opts);
      rstd_h = torch::empty({B, Tn}, opts);
      mean_c = torch::empty({B, Tn}, opts);
      rstd_c = torch::empty({B, Tn}, opts);
      Xk = xk;
      rstd_x = torch::empty({B, Tn}, opts);
      mean_x = torch::empty({B, Tn}, opts);
    }
    if (fl.proj) Hu = buffer_pool::empty({B, Tn, U}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(xk.scalar_type(), "lstm_variant_forward", [&] {
    using T = scalar_t;
    auto v = variant_tensors<T>(xk, gate_gain, bias, R, torch::Tensor(), rd, peep, gain_c, shift_c, P,
                                torch::Tensor(), Zoneout{zoneout_seed, zoneout_offset, keep_h, keep_c}, mask, coupled);
    auto p = [](torch::Tensor& t) -> T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    T *Yp = p(Y), *hTp = p(hT), *cTp = p(cT), *Gp = p(G), *Hpp = p(Hp), *Cpp = p(Cp), *Ap = p(Ahat),
      *rhp = p(rstd_h), *mcp = p(mean_c), *rcp = p(rstd_c), *rxp = p(rstd_x), *mxp = p(mean_x), *Hup = p(Hu),
      *Htrp = p(Htr), *Ctrp = p(Ctr), *Xp = xk.data_ptr<T>();
    const T* h0p = h0.data_ptr<T>();
    const T* c0p = c0.data_ptr<T>();
    over_chunks(B, Ps * GU, [&](int64_t b0, int64_t b1) {
      variant_forward_rows<T>(v, fl, b0, b1, Xp, h0p, c0p, Yp, hTp, cTp, Gp, Hpp, Cpp, Ap, rhp, mcp, rcp, rxp,
                              mxp, Hup, Htrp, Ctrp);
    });
  });
  if (!save) return {Y, hT, cT};
  if (!trace) return {Y, hT, cT, G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x};
  return {Y, hT, cT, G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x, Htr, Ctr};
}

// saved: the forward's G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, xk, rstd_x, mean_x (empty
// where unused).
// Returns dxk [B,T,GU], DA [B,T,GU] (layer norm; else undefined: it equals dxk), Dr [B,T,Ps]
// (projection), dh0, dc0, d peephole ([3,U] rows i f o, or [2,U] f o when coupled), d gain_c,
// d shift_c [U] and d gate_gain [2,GU] (layer norm), d bias [GU] (with a bias).
// consume: the saved buffers are not read again, so dxk is written over G (with layer norm: over xk,
// and DA over Ahat), rows each step has just read, in cache: a fresh buffer's lines are first
// fetched for ownership (backward at (32,80,100,64), 2 threads, paired: cell_clip -8%, layer norm -6%).
std::vector<torch::Tensor> variant_backward(
    c10::optional<torch::Tensor> dY_o, c10::optional<torch::Tensor> dhT_o, c10::optional<torch::Tensor> dcT_o,
    std::vector<torch::Tensor> saved, c10::optional<torch::Tensor> gate_gain_o, c10::optional<torch::Tensor> bias_o,
    torch::Tensor R, c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
    c10::optional<torch::Tensor> gain_c_o, c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
    int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h, int64_t keep_c,
    c10::optional<torch::Tensor> mask_o, bool backwards, bool zero_out, bool seq, bool coupled, int64_t act,
    int64_t ract, double clip, bool consume) {
  at::NoGradGuard no_grad;
  auto G = saved[0].contiguous(), Hp = saved[1].contiguous(), Cp = saved[2].contiguous();
  auto Ahat = saved[3], rstd_h = saved[4], mean_c = saved[5], rstd_c = saved[6], Xk = saved[8], rstd_x = saved[9],
       mean_x = saved[10];
  auto dY = dY_o.has_value() ? buffer_pool::contiguous(*dY_o) : torch::Tensor();
  auto dhT = contiguous_or_none(dhT_o), dcT = contiguous_or_none(dcT_o);
  auto rd = contiguous_or_none(rd_o), peep = contiguous_or_none(peep_o), gain_c = contiguous_or_none(gain_c_o),
       shift_c = contiguous_or_none(shift_c_o), P = contiguous_or_none(P_o),
       gate_gain = contiguous_or_none(gate_gain_o), bias = contiguous_or_none(bias_o), mask = bool_or_none(mask_o);
  R = R.contiguous();
  auto RT = R.t().contiguous();
  auto PT = P.defined() ? P.t().contiguous() : torch::Tensor();
  VariantFlags fl{backwards, zero_out, seq, coupled, peep.defined(), gate_gain.defined(), P.defined(), true,
                  static_cast<int>(act), static_cast<int>(ract), clip};
  const int64_t B = G.size(0), Tn = G.size(1), GU = G.size(2), Ps = R.size(0), U = GU / (coupled ? 3 : 4);
  auto opts = G.options();
  const bool in_place = consume && (!fl.ln || (Xk.is_contiguous() && Ahat.is_contiguous()));
  auto dXW = in_place ? (fl.ln ? Xk : G) : buffer_pool::empty({B, Tn, GU}, opts);
  auto DA = fl.ln ? (in_place ? Ahat : buffer_pool::empty({B, Tn, GU}, opts)) : torch::Tensor();
  auto Dr = fl.proj ? buffer_pool::empty({B, Tn, Ps}, opts) : torch::Tensor();
  auto dh0 = torch::empty({B, Ps}, opts), dc0 = torch::empty({B, U}, opts);
  torch::Tensor dpeep, dgain_c, dshift_c, dgate_gain, dbias;  // the weight gradients' sums
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_variant_backward", [&] {
    using T = scalar_t;
    auto v = variant_tensors<T>(G, gate_gain, bias, R, RT, rd, peep, gain_c, shift_c, P, PT,
                                Zoneout{zoneout_seed, zoneout_offset, keep_h, keep_c}, mask, coupled);
    auto cp = [](const torch::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    auto p = [](torch::Tensor& t) -> T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    // Per-row weight-gradient sums: each chunk adds into its first batch row's (no races between
    // threads), in plain memory summed below, not as [B, ...] tensors summed by tensor ops (three
    // more ops per gradient in every training step).
    std::vector<T> peep_rows(fl.peephole ? B * 3 * U : 0), norm_c_rows(fl.ln ? B * 2 * U : 0);
    std::vector<T> gain_rows(fl.ln ? B * 2 * GU : 0), bias_rows(bias.defined() ? B * GU : 0);  // gains: g_x, g_h
    std::vector<char> chunk_start(B, 0);
    auto data = [](std::vector<T>& rows) { return rows.empty() ? nullptr : rows.data(); };
    over_chunks(B, Ps * GU, [&](int64_t b0, int64_t b1) {
      if (b1 > b0) chunk_start[b0] = 1;  // (an empty batch runs one empty chunk)
      variant_backward_rows<T>(v, fl, b0, b1, cp(dY), cp(dhT), cp(dcT), cp(G), cp(Hp), cp(Cp), cp(Ahat),
                               cp(rstd_h), cp(mean_c), cp(rstd_c), cp(Xk), cp(rstd_x), cp(mean_x), p(dXW), p(DA),
                               p(Dr), p(dh0), p(dc0), data(peep_rows), data(norm_c_rows), data(gain_rows),
                               data(bias_rows));
    });
    // columns [offset, offset + numel(shape)) of the rows (`width` wide), summed over the chunks
    auto total = [&](const std::vector<T>& rows, int64_t width, int64_t offset, at::IntArrayRef shape) {
      auto out = torch::zeros(shape, opts);
      T* o = out.data_ptr<T>();
      for (int64_t b = 0; b < B; ++b)
        if (chunk_start[b])
          for (int64_t j = 0; j < out.numel(); ++j) o[j] += rows[b * width + offset + j];
      return out;
    };
    if (fl.peephole)  // rows i f o, or f o when coupled
      dpeep = coupled ? total(peep_rows, 3 * U, U, {2, U}) : total(peep_rows, 3 * U, 0, {3, U});
    if (fl.ln) {
      dgain_c = total(norm_c_rows, 2 * U, 0, {U});
      dshift_c = total(norm_c_rows, 2 * U, U, {U});
      dgate_gain = total(gain_rows, 2 * GU, 0, {2, GU});
    }
    if (bias.defined()) dbias = total(bias_rows, GU, 0, {GU});
  });
  return {dXW, DA, Dr, dh0, dc0, dpeep, dgain_c, dshift_c, dgate_gain, dbias};
}
