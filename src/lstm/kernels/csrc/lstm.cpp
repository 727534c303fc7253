// The plain LSTM's recurrence over raw buffers (rnn.h: lstm::ForwardPass, lstm::BackwardPass).
// Forward: per step one recurrent GEMM (MKL sgemm_/dgemm_ as ATen calls them, or a register loop
// for tiny batches) and the gate math fused in one vectorised pass over the caller's projection
// xw, which becomes the activated gates in place. Backward: BPTT derived by hand over the saved
// gates and states, writing dZ for the caller's weight-gradient GEMMs.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "lstm_cell.h"
#include "rnn.h"
#include "simd.h"
#include "threads.h"

namespace lstm_core {
namespace lstm {
namespace {

// ForwardPass::run for one chunk of batch rows: B its rows, the pointers at its first row (the
// recurrent dropout masks' gates rdG apart).
template <typename T>
void forward_loop(int64_t B, int64_t Tn, int64_t U, T* xw, const T* bias, const T* R, const T* rd, int64_t rdG,
                  const bool* keep, const Flags& fl, const T* h0, const T* c0, T* Y, T* hT, T* cT, T* Hp, T* Cp) {
  const int64_t GU = 4 * U;
  const int64_t ldz = Tn * GU;
  const bool save = Hp != nullptr;
  std::vector<T> hbuf(save ? 0 : 2 * B * U), cbuf(save ? 0 : 2 * B * U), ylast(fl.seq ? 0 : B * U, T(0));
  std::vector<T> hm(rd ? 4 * B * U : 0);
  const StepOperand<T> rec(B, GU, U, R, GU, rd ? 0 : Tn);  // (recurrent dropout: four products per step)
  // state before step s: pointer and leading dimension
  auto hprev_of = [&](int64_t s, int64_t t, int64_t& ld) -> T* {
    if (save) { ld = Tn * U; return Hp + t * U; }
    ld = U;
    return hbuf.data() + (s % 2) * B * U;
  };
  auto cprev_of = [&](int64_t s, int64_t t) -> T* { return save ? Cp + t * U : cbuf.data() + (s % 2) * B * U; };
  {  // initial state
    int64_t ld;
    int64_t t0 = fl.backwards ? Tn - 1 : 0;
    T* hp = hprev_of(0, t0, ld);
    T* cp = cprev_of(0, t0);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(hp + b * ld, h0 + b * U, U * sizeof(T));
      std::memcpy(cp + b * ld, c0 + b * U, U * sizeof(T));
    }
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    const bool last = s == Tn - 1;
    const int64_t tn = fl.backwards ? t - 1 : t + 1;
    int64_t ldh, ldn = U;
    T* hp = hprev_of(s, t, ldh);
    T* cp = cprev_of(s, t);
    T* hn;
    T* cn;
    if (last) {
      hn = hT; cn = cT; ldn = U;
    } else {
      hn = hprev_of(s + 1, tn, ldn);
      cn = cprev_of(s + 1, tn);
    }
    T* z = xw + t * GU;
    if (rd == nullptr) {
      rec.acc(hp, ldh, z, ldz);
    } else {
      for (int64_t g = 0; g < 4; ++g) {
        T* dst = hm.data() + g * B * U;
        const T* m = rd + g * rdG;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < U; ++j) dst[b * U + j] = hp[b * ldh + j] * m[b * U + j];
        mm_acc<T>(B, U, U, dst, U, R + g * U, GU, z + g * U, ldz);
      }
    }
    over_rows(B, 5 * U, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (!last) {  // this row's buffers at the next step
          prefetch_write(xw + b * ldz + tn * GU, GU);
          if (save && s + 2 < Tn) {
            const int64_t tnn = fl.backwards ? tn - 1 : tn + 1;
            prefetch_write(Hp + (b * Tn + tnn) * U, U);
            prefetch_write(Cp + (b * Tn + tnn) * U, U);
          }
          if (fl.seq) prefetch_write(Y + (b * Tn + s + 1) * U, U);
        }
        T* zr = z + b * ldz;
        const T* cpr = cp + b * ldh;  // Cp shares Hp's layout
        const T* hpr = hp + b * ldh;
        T* cnr = cn + b * ldn;
        T* hnr = hn + b * ldn;
        const bool kept = keep == nullptr || keep[b * Tn + t];
        T* yrow = fl.seq ? Y + (b * Tn + s) * U : ylast.data() + b * U;
        if (bias)
          for (int64_t j = 0; j < GU; ++j) zr[j] += bias[j];
        if (kept) {
          gate_row(zr, cpr, cnr, hnr, U, fl.act, fl.ract);
          std::memcpy(yrow, hnr, U * sizeof(T));
        } else {
          // activated gates are still saved (the backward ignores masked steps)
          if (fl.act == fl.ract) {
            act_inplace(fl.act, zr, 4 * U);
          } else {
            act_inplace(fl.ract, zr, 2 * U);
            act_inplace(fl.act, zr + 2 * U, U);
            act_inplace(fl.ract, zr + 3 * U, U);
          }
          if (cnr != cpr) std::memcpy(cnr, cpr, U * sizeof(T));
          if (hnr != hpr) std::memcpy(hnr, hpr, U * sizeof(T));
          if (fl.seq) {
            if (fl.zero_out || s == 0) std::memset(yrow, 0, U * sizeof(T));
            else std::memcpy(yrow, Y + (b * Tn + s - 1) * U, U * sizeof(T));
          } else if (fl.zero_out) {
            std::memset(yrow, 0, U * sizeof(T));
          }
        }
      }
    });
  }
  if (!fl.seq && Tn > 0) std::memcpy(Y, ylast.data(), B * U * sizeof(T));
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

// dZ of one row for sigmoid gates and tanh (restrict: vectorised without alias checks)
template <typename T>
inline void bwd_row_sigmoid_tanh(const T* __restrict__ g, const T* __restrict__ cp, const T* __restrict__ dctv,
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

// BackwardPass::run for one chunk of batch rows, as forward_loop.
template <typename T>
void backward_loop(int64_t B, int64_t Tn, int64_t U, const T* dY, const T* G, const T* Hp, const T* Cp,
                   const T* RT, const T* rd, int64_t rdG, const bool* keep, const Flags& fl, T* dh, T* dc, T* dZ,
                   T* db_rows) {
  const int64_t GU = 4 * U;
  const int64_t ldz = Tn * GU;
  const bool carry_on = keep != nullptr && !fl.zero_out;
  std::vector<T> carry(carry_on ? B * U : 0, T(0)), dhp(B * U), tmp(rd ? B * U : 0);
  const StepOperand<T> rec_t(B, U, GU, RT, U, rd ? 0 : Tn);  // (recurrent dropout: four products per step)
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    const T* dy = nullptr;
    int64_t ldy = 0;
    if (dY != nullptr) {
      if (fl.seq) { dy = dY + s * U; ldy = Tn * U; }
      else if (s == Tn - 1) { dy = dY; ldy = U; }
    }
    T* dz = dZ + t * GU;
    over_rows(B, 8 * U, [&](int64_t b0, int64_t b1) {
      std::vector<T> dhn(U), tc(U), d1(U), d2(U);
      for (int64_t b = b0; b < b1; ++b) {
        if (s > 0) {  // this row's buffers at the next step (the previous one in time)
          const int64_t next = b * Tn + (fl.backwards ? t + 1 : t - 1);
          prefetch_read(G + next * GU, GU);
          prefetch_read(Cp + next * U, U);
          prefetch_write(dZ + next * GU, GU);
          if (dy && fl.seq) prefetch_read(dy + b * ldy - U, U);
        }
        const bool kept = keep == nullptr || keep[b * Tn + t];
        T* d = dz + b * ldz;
        T* dhb = dh + b * U;
        T* dcb = dc + b * U;
        if (!kept) {
          std::memset(d, 0, GU * sizeof(T));
          if (carry_on && dy) {
            T* cr = carry.data() + b * U;
            const T* dyr = dy + b * ldy;
            for (int64_t j = 0; j < U; ++j) cr[j] += dyr[j];
          }
          continue;
        }
        const T* g = G + b * ldz + t * GU;
        const T* gi = g;
        const T* gf = g + U;
        const T* gg = g + 2 * U;
        const T* go = g + 3 * U;
        const T* cp = Cp + (b * Tn + t) * U;
        std::memcpy(dhn.data(), dhb, U * sizeof(T));
        if (dy) {
          const T* dyr = dy + b * ldy;
          for (int64_t j = 0; j < U; ++j) dhn[j] += dyr[j];
        }
        if (carry_on) {
          T* cr = carry.data() + b * U;
          for (int64_t j = 0; j < U; ++j) { dhn[j] += cr[j]; cr[j] = T(0); }
        }
        for (int64_t j = 0; j < U; ++j) tc[j] = gf[j] * cp[j] + gi[j] * gg[j];
        act_inplace(fl.act, tc.data(), U);
        dact_arr(fl.act, tc.data(), d1.data(), U);
        // dct = dc + dhn * o * act'(tanh c)
        for (int64_t j = 0; j < U; ++j) d1[j] = dcb[j] + dhn[j] * go[j] * d1[j];
        if (fl.ract == 1 && fl.act == 0) {
          bwd_row_sigmoid_tanh(g, cp, d1.data(), dhn.data(), tc.data(), d, dcb, U);
        } else {
          for (int64_t j = 0; j < U; ++j) {
            const T dct = d1[j], i = gi[j], f = gf[j], gv = gg[j], o = go[j];
            d[j] = dct * gv * dact(fl.ract, i);
            d[U + j] = dct * cp[j] * dact(fl.ract, f);
            d[2 * U + j] = dct * i * dact(fl.act, gv);
            d[3 * U + j] = dhn[j] * tc[j] * dact(fl.ract, o);
            dcb[j] = dct * f;
          }
        }
        if (db_rows) {  // this batch row's bias gradient, summed over its steps
          T* dbr = db_rows + b * GU;
          for (int64_t j = 0; j < GU; ++j) dbr[j] += d[j];
        }
      }
    });
    // dh_{t-1} = dZ_t @ R^T (per gate times the recurrent dropout masks); RT = R^T [4U, U]
    if (rd == nullptr) {
      rec_t.set(dz, ldz, dhp.data(), U);
    } else {
      std::fill(dhp.begin(), dhp.end(), T(0));
      for (int64_t g = 0; g < 4; ++g) {
        mm_set<T>(B, U, U, dz + g * U, ldz, RT + g * U * U, U, tmp.data(), U);
        const T* m = rd + g * rdG;
        for (int64_t k = 0; k < B * U; ++k) dhp[k] += tmp[k] * m[k];
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      if (keep == nullptr || keep[b * Tn + t]) std::memcpy(dh + b * U, dhp.data() + b * U, U * sizeof(T));
    }
  }
}

}  // namespace

template <typename T>
ForwardPass<T>::ForwardPass(int64_t batch, int64_t steps, int64_t units, const Flags& flags)
    : B_(batch), Tn_(steps), U_(units), flags_(flags) {}

template <typename T>
void ForwardPass<T>::run(T* xw, const T* bias, const T* R, const T* rec_drop, const bool* keep, const T* h0,
                         const T* c0, T* Y, T* hT, T* cT, T* Hp, T* Cp) const {
  const int64_t B = B_, Tn = Tn_, U = U_;
  over_chunks(B, U * 4 * U, [&](int64_t b0, int64_t b1) {
    forward_loop<T>(b1 - b0, Tn, U, xw + b0 * Tn * 4 * U, bias, R, rec_drop ? rec_drop + b0 * U : nullptr, B * U,
                    keep ? keep + b0 * Tn : nullptr, flags_, h0 + b0 * U, c0 + b0 * U,
                    Y + b0 * (flags_.seq ? Tn : 1) * U, hT + b0 * U, cT + b0 * U, Hp ? Hp + b0 * Tn * U : nullptr,
                    Cp ? Cp + b0 * Tn * U : nullptr);
  });
}

template <typename T>
void ForwardPass<T>::run_fused_input(int64_t input_size, const T* x, const T* W, const T* bias, const bool* keep,
                                     const T* h0, const T* c0, T* Y, T* hT, T* cT) const {
  const int64_t B = B_, Tn = Tn_, D = input_size, U = U_;
  over_chunks(B, (D + U) * 4 * U, [&](int64_t b0, int64_t b1) {
    forward_loop_xh<T>(b1 - b0, Tn, D, U, x + b0 * Tn * D, W, bias, keep ? keep + b0 * Tn : nullptr, flags_,
                       h0 + b0 * U, c0 + b0 * U, Y + b0 * (flags_.seq ? Tn : 1) * U, hT + b0 * U, cT + b0 * U);
  });
}

template <typename T>
BackwardPass<T>::BackwardPass(int64_t batch, int64_t steps, int64_t units, const Flags& flags)
    : B_(batch), Tn_(steps), U_(units), flags_(flags) {}

template <typename T>
void BackwardPass<T>::run(const T* dY, const T* G, const T* Hp, const T* Cp, const T* RT, const T* rec_drop,
                          const bool* keep, T* dh, T* dc, T* dZ, T* db_rows) const {
  const int64_t B = B_, Tn = Tn_, U = U_, GU = 4 * U;
  over_chunks(B, U * 4 * U, [&](int64_t b0, int64_t b1) {
    backward_loop<T>(b1 - b0, Tn, U, dY ? dY + b0 * (flags_.seq ? Tn : 1) * U : nullptr, G + b0 * Tn * GU,
                     Hp + b0 * Tn * U, Cp + b0 * Tn * U, RT, rec_drop ? rec_drop + b0 * U : nullptr, B * U,
                     keep ? keep + b0 * Tn : nullptr, flags_, dh + b0 * U, dc + b0 * U, dZ + b0 * Tn * GU,
                     db_rows ? db_rows + b0 * GU : nullptr);
  });
}

template class ForwardPass<float>;
template class ForwardPass<double>;
template class BackwardPass<float>;
template class BackwardPass<double>;

}  // namespace lstm
}  // namespace lstm_core
