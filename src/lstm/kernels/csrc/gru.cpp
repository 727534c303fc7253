// The GRU's recurrences (rnn.h: gru::forward_loop, gru::backward_loop), float and double.
//
// Forward, per step: the recurrent GEMM (StepOperand: MKL, register tiles for batch <= 4, the
// weights packed once for big steps), then the gate math in one vectorised pass per row, in place
// in the input projection (which becomes the saved gates). reset_after = false needs the reset
// gate before the candidate's product: two GEMMs (h R_zr, then (r * h) R_h) and two passes.
// Backward, per step: dz from the saved gates, then dh_{t-1} = dh_new * z + dz_rec R^T in one GEMM
// (reset_after: dz's columns are ordered d(h R_h) | dz | dr, the recurrent row's blocks side by
// side, and R^T's blocks are permuted to match) or two (reset_after = false: d(r * h) = dh_tilde
// R_h^T comes first, dr needs it).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "low_precision.h"
#include "operand_right.h"
#include "rnn.h"
#include "sequence_rows.h"
#include "simd.h"
#include "threads.h"

namespace lstm_core {
namespace gru {

template <typename Scalar>
Forward<Scalar> Forward<Scalar>::rows(int64_t b0, int64_t b1, const SequenceOptions& options) const {
  Forward r = *this;
  const int64_t T = steps, U = units;
  r.batch = b1 - b0;
  r.gates = gates + b0 * T * 3 * U;
  r.recurrent_dropout = recurrent_dropout ? recurrent_dropout + b0 * U : nullptr;
  r.keep = keep ? keep + b0 * T : nullptr;
  r.h0 = h0 + b0 * U;
  r.y = y + b0 * (options.return_sequences ? T : 1) * U;
  r.h_last = h_last + b0 * U;
  r.h_prev = h_prev ? h_prev + b0 * T * U : nullptr;
  r.candidate_input = candidate_input ? candidate_input + b0 * T * U : nullptr;
  return r;
}

template <typename Scalar>
Backward<Scalar> Backward<Scalar>::rows(int64_t b0, int64_t b1, const SequenceOptions& options) const {
  Backward r = *this;
  const int64_t T = steps, U = units, width = (options.reset_after ? 4 : 3) * U;
  r.batch = b1 - b0;
  r.dy = dy ? dy + b0 * (options.return_sequences ? T : 1) * U : nullptr;
  r.gates = gates + b0 * T * 3 * U;
  r.h_prev = h_prev + b0 * T * U;
  r.candidate_input = candidate_input + b0 * T * U;
  r.recurrent_dropout = recurrent_dropout ? recurrent_dropout + b0 * U : nullptr;
  r.keep = keep ? keep + b0 * T : nullptr;
  r.dh = dh + b0 * U;
  r.dz = dz + b0 * T * width;
  r.bias_rows = bias_rows ? bias_rows + b0 * width : nullptr;
  return r;
}

namespace {

// h_new = z * h + (1 - z) * h_tilde into the state and the output row (a kept step)
template <typename Scalar>
inline void new_state_row(const Scalar* __restrict__ z, const Scalar* __restrict__ h_tilde,
                          const Scalar* __restrict__ h, Scalar* __restrict__ h_new, Scalar* __restrict__ y,
                          int64_t U) {
  for (int64_t j = 0; j < U; ++j) {
    const Scalar v = h_tilde[j] + z[j] * (h[j] - h_tilde[j]);
    h_new[j] = v;
    y[j] = v;
  }
}

// rows [B,U] (stride ld) times a dropout keep-mask [B,U] into out [B,U]
template <typename Scalar>
inline void masked_rows(int64_t B, int64_t U, const Scalar* h, int64_t ld, const Scalar* mask, Scalar* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < U; ++j) out[b * U + j] = h[b * ld + j] * mask[b * U + j];
}

}  // namespace

template <typename Scalar>
void forward_loop(const Forward<Scalar>& a, const SequenceOptions& o) {
  const int64_t B = a.batch, Tn = a.steps, U = a.units, GU = 3 * U, ldg = Tn * GU;
  const bool save = a.h_prev != nullptr;
  const Scalar* R = a.recurrent_kernel;
  const Scalar* rd = a.recurrent_dropout;
  StateRows<Scalar> state(a.h_prev, a.h_last, a.h0, B, Tn, U, o.go_backwards);
  // z | r take both bias rows, the candidate's input part the input row (its recurrent part is
  // added to h R_h, inside the reset gate's product)
  std::vector<Scalar> bias(GU, Scalar(0)), candidate_bias(U, Scalar(0));
  if (a.input_bias) std::copy(a.input_bias, a.input_bias + GU, bias.begin());
  if (o.reset_after && a.recurrent_bias) {
    for (int64_t j = 0; j < 2 * U; ++j) bias[j] += a.recurrent_bias[j];
    std::copy(a.recurrent_bias + 2 * U, a.recurrent_bias + GU, candidate_bias.begin());
  }
  std::vector<Scalar> masked_h(rd ? B * U : 0);
  // reset_after: h R of the step [B,3U]; else r * h of the step when it is not saved [B,U]
  std::vector<Scalar> scratch(o.reset_after ? B * GU : (save ? 0 : B * U));
  // (recurrent dropout: a product per gate, on masked copies of h)
  const uint16_t* R_low = a.recurrent_kernel_low;
  const StepProduct<Scalar> product_all(B, o.reset_after ? GU : 2 * U, U, R, GU, rd ? 0 : Tn, o.operand, R_low);
  const StepProduct<Scalar> product_candidate(B, U, U, R + 2 * U, GU, o.reset_after ? 0 : Tn, o.operand,
                                              R_low ? R_low + 2 * U : nullptr);

  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_index(s, Tn, o.go_backwards);
    const int64_t t_next = o.go_backwards ? t - 1 : t + 1;
    int64_t ldh, ldn;
    const Scalar* hp = state.before(s, ldh);
    Scalar* hn = state.before(s + 1, ldn);
    Scalar* g_t = a.gates + t * GU;
    auto prefetch_next = [&](int64_t b) {
      if (s + 1 == Tn) return;
      prefetch_write(g_t + b * ldg + (t_next - t) * GU, GU);
      if (save) prefetch_write(a.candidate_input + (b * Tn + t_next) * U, U);
      if (o.return_sequences) prefetch_write(a.y + (b * Tn + s + 1) * U, U);
    };
    auto finish_row = [&](int64_t b, const Scalar* zr, const Scalar* hpr) {
      Scalar* yrow = output_row(a.y, b, s, Tn, U, o.return_sequences);
      Scalar* hnr = hn + b * ldn;
      if (a.keep == nullptr || a.keep[b * Tn + t]) {
        new_state_row(zr, zr + 2 * U, hpr, hnr, yrow, U);
        if (o.operand) {
          round_operands(o.operand, hnr, U);
          std::memcpy(yrow, hnr, U * sizeof(Scalar));
        }
      } else {
        std::memcpy(hnr, hpr, U * sizeof(Scalar));
        masked_output(yrow, s, U, o);
      }
    };
    if (o.reset_after) {
      Scalar* rec = scratch.data();
      if (rd == nullptr) {
        product_all.set(hp, ldh, rec, GU);
      } else {
        for (int64_t g = 0; g < 3; ++g) {
          masked_rows(B, U, hp, ldh, rd + g * a.dropout_gate_stride, masked_h.data());
          round_operands(o.operand, masked_h.data(), B * U);
          mm_set<Scalar>(B, U, U, masked_h.data(), U, R + g * U, GU, rec + g * U, GU);
        }
      }
      over_rows(B, 8 * U, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          prefetch_next(b);
          Scalar* zr = g_t + b * ldg;
          Scalar* recr = rec + b * GU;
          for (int64_t j = 0; j < 2 * U; ++j) zr[j] += recr[j] + bias[j];
          act_inplace(o.recurrent_activation, zr, 2 * U);
          Scalar* hh = recr + 2 * U;  // h R_h + b_rec_h
          const Scalar* r = zr + U;
          Scalar* xh = zr + 2 * U;
          for (int64_t j = 0; j < U; ++j) {
            hh[j] += candidate_bias[j];
            xh[j] += bias[2 * U + j] + r[j] * hh[j];
          }
          act_inplace(o.activation, xh, U);
          if (save) std::memcpy(a.candidate_input + (b * Tn + t) * U, hh, U * sizeof(Scalar));
          finish_row(b, zr, hp + b * ldh);
        }
      });
    } else {
      if (rd == nullptr) {
        product_all.acc(hp, ldh, g_t, ldg);
      } else {
        for (int64_t g = 0; g < 2; ++g) {
          masked_rows(B, U, hp, ldh, rd + g * a.dropout_gate_stride, masked_h.data());
          round_operands(o.operand, masked_h.data(), B * U);
          mm_acc<Scalar>(B, U, U, masked_h.data(), U, R + g * U, GU, g_t + g * U, ldg);
        }
      }
      Scalar* rh = save ? a.candidate_input + t * U : scratch.data();  // r * h * dropout_h
      const int64_t ldr = save ? Tn * U : U;
      const Scalar* mask_h = rd ? rd + 2 * a.dropout_gate_stride : nullptr;
      over_rows(B, 4 * U, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          Scalar* zr = g_t + b * ldg;
          for (int64_t j = 0; j < 2 * U; ++j) zr[j] += bias[j];
          act_inplace(o.recurrent_activation, zr, 2 * U);
          const Scalar* r = zr + U;
          const Scalar* hpr = hp + b * ldh;
          Scalar* rhr = rh + b * ldr;
          for (int64_t j = 0; j < U; ++j) rhr[j] = r[j] * hpr[j];
          if (mask_h)
            for (int64_t j = 0; j < U; ++j) rhr[j] *= mask_h[b * U + j];
          round_operands(o.operand, rhr, U);
        }
      });
      product_candidate.acc(rh, ldr, g_t + 2 * U, ldg);
      over_rows(B, 4 * U, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          prefetch_next(b);
          Scalar* zr = g_t + b * ldg;
          Scalar* xh = zr + 2 * U;
          for (int64_t j = 0; j < U; ++j) xh[j] += bias[2 * U + j];
          act_inplace(o.activation, xh, U);
          finish_row(b, zr, hp + b * ldh);
        }
      });
    }
  }
}

template <typename Scalar>
void backward_loop(const Backward<Scalar>& a, const SequenceOptions& o) {
  const int64_t B = a.batch, Tn = a.steps, U = a.units, GU = 3 * U, ldg = Tn * GU;
  const int64_t width = o.reset_after ? 4 * U : 3 * U, ldz = Tn * width;
  const Scalar* RT = a.recurrent_kernel_t;
  const Scalar* rd = a.recurrent_dropout;
  const bool carry_on = a.keep != nullptr && !o.zero_output_for_mask;
  std::vector<Scalar> carry(carry_on ? B * U : 0, Scalar(0));
  std::vector<Scalar> dh_prev(B * U), product(rd || !o.reset_after ? B * U : 0);
  // per row: dL/dh_new, then act' of z, r and h_tilde
  std::vector<Scalar> rows_scratch(B * 4 * U);
  // dh_prev += dz_rec @ RT: reset_after all three blocks at once (dz's first 3U columns), else z | r
  const uint16_t* RT_low = a.recurrent_kernel_t_low;
  const StepProduct<Scalar> product_rec(B, U, o.reset_after ? GU : 2 * U, RT, U, rd ? 0 : Tn, o.operand, RT_low);
  const StepProduct<Scalar> product_candidate(B, U, U, RT + 2 * U * U, U, o.reset_after ? 0 : Tn, o.operand,
                                              RT_low ? RT_low + 2 * U * U : nullptr);
  auto kept = [&](int64_t b, int64_t t) { return a.keep == nullptr || a.keep[b * Tn + t]; };

  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = time_index(s, Tn, o.go_backwards);
    const int64_t t_next = o.go_backwards ? t + 1 : t - 1;  // the step processed next (earlier in time)
    Scalar* dz_t = a.dz + t * width;
    // dL/dh_new, the direct part of dh_prev (dh_new * z), and dz where it needs no product
    auto first_pass = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (s > 0) {
          prefetch_read(a.gates + b * ldg + t_next * GU, GU);
          prefetch_read(a.h_prev + (b * Tn + t_next) * U, U);
          prefetch_read(a.candidate_input + (b * Tn + t_next) * U, U);
          prefetch_write(a.dz + b * ldz + t_next * width, width);
        }
        Scalar* d = dz_t + b * ldz;
        Scalar* dhp = dh_prev.data() + b * U;
        const Scalar* dyr = output_grad_row(a.dy, b, s, Tn, U, o.return_sequences);
        if (!kept(b, t)) {
          std::memset(d, 0, width * sizeof(Scalar));
          std::memset(dhp, 0, U * sizeof(Scalar));
          if (carry_on && dyr)
            for (int64_t j = 0; j < U; ++j) carry[b * U + j] += dyr[j];
          continue;
        }
        Scalar* dhn = rows_scratch.data() + b * 4 * U;
        Scalar* dz_act = dhn + U;
        Scalar* dr_act = dhn + 2 * U;
        Scalar* dh_act = dhn + 3 * U;
        state_grad_row(a.dh + b * U, dyr, carry_on ? carry.data() + b * U : nullptr, dhn, U);
        const Scalar* z = a.gates + b * ldg + t * GU;
        const Scalar* r = z + U;
        const Scalar* ht = z + 2 * U;
        const Scalar* hp = a.h_prev + (b * Tn + t) * U;
        dact_arr(o.recurrent_activation, z, dz_act, U);
        dact_arr(o.recurrent_activation, r, dr_act, U);
        dact_arr(o.activation, ht, dh_act, U);
        if (o.reset_after) {
          const Scalar* hh = a.candidate_input + (b * Tn + t) * U;
          for (int64_t j = 0; j < U; ++j) {
            const Scalar dah = dhn[j] * (Scalar(1) - z[j]) * dh_act[j];
            d[j] = dah * r[j];
            d[U + j] = dhn[j] * (hp[j] - ht[j]) * dz_act[j];
            d[2 * U + j] = dah * hh[j] * dr_act[j];
            d[3 * U + j] = dah;
            dhp[j] = dhn[j] * z[j];
          }
          if (a.bias_rows)
            for (int64_t j = 0; j < width; ++j) a.bias_rows[b * width + j] += d[j];
        } else {
          for (int64_t j = 0; j < U; ++j) {
            d[j] = dhn[j] * (hp[j] - ht[j]) * dz_act[j];
            d[2 * U + j] = dhn[j] * (Scalar(1) - z[j]) * dh_act[j];
            dhp[j] = dhn[j] * z[j];
          }
        }
      }
    };
    over_rows(B, 12 * U, first_pass);
    if (!o.reset_after) {
      // d(r * h * dropout_h) = dh_tilde R_h^T, then dr and the candidate's part of dh_prev
      Scalar* d_rh = product.data();
      product_candidate.set(dz_t + 2 * U, ldz, d_rh, U);
      const Scalar* mask_h = rd ? rd + 2 * a.dropout_gate_stride : nullptr;
      over_rows(B, 4 * U, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          if (!kept(b, t)) continue;
          Scalar* d = dz_t + b * ldz;
          Scalar* dhp = dh_prev.data() + b * U;
          Scalar* v = d_rh + b * U;
          if (mask_h)
            for (int64_t j = 0; j < U; ++j) v[j] *= mask_h[b * U + j];
          const Scalar* r = a.gates + b * ldg + t * GU + U;
          const Scalar* dr_act = rows_scratch.data() + b * 4 * U + 2 * U;
          const Scalar* hp = a.h_prev + (b * Tn + t) * U;
          for (int64_t j = 0; j < U; ++j) {
            d[U + j] = v[j] * hp[j] * dr_act[j];
            dhp[j] += v[j] * r[j];
          }
          if (a.bias_rows)
            for (int64_t j = 0; j < width; ++j) a.bias_rows[b * width + j] += d[j];
        }
      });
    }
    if (rd == nullptr) {
      product_rec.acc(dz_t, ldz, dh_prev.data(), U);
    } else {
      // block k of dz against block k of RT, times the keep-mask of its gate
      const int64_t blocks = o.reset_after ? 3 : 2;
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t gate = o.reset_after ? (k + 2) % 3 : k;  // reset_after: blocks h | z | r
        mm_set<Scalar>(B, U, U, dz_t + k * U, ldz, RT + k * U * U, U, product.data(), U);
        const Scalar* m = rd + gate * a.dropout_gate_stride;
        for (int64_t i = 0; i < B * U; ++i) dh_prev[i] += product[i] * m[i];
      }
    }
    for (int64_t b = 0; b < B; ++b)
      if (kept(b, t)) std::memcpy(a.dh + b * U, dh_prev.data() + b * U, U * sizeof(Scalar));
  }
}

template struct Forward<float>;
template struct Forward<double>;
template struct Backward<float>;
template struct Backward<double>;
template void forward_loop<float>(const Forward<float>&, const SequenceOptions&);
template void forward_loop<double>(const Forward<double>&, const SequenceOptions&);
template void backward_loop<float>(const Backward<float>&, const SequenceOptions&);
template void backward_loop<double>(const Backward<double>&, const SequenceOptions&);

}  // namespace gru
}  // namespace lstm_core
