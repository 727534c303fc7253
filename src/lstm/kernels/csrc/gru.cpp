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
// Each thread runs every step for its chunk of the rows (row_layout.h): batch-major, or packed,
// where a step's products and gate math take only the rows that take the step.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "low_precision.h"
#include "operand_right.h"
#include "rnn.h"
#include "row_layout.h"
#include "sequence_rows.h"
#include "simd.h"
#include "threads.h"

namespace lstm_core {
namespace gru {
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

// rows [n,U] (stride ld) times their dropout keep-masks (stride ld_mask) into out [n,U]
template <typename Scalar>
inline void masked_rows(int64_t n, int64_t U, const Scalar* h, int64_t ld, const Scalar* mask, int64_t ld_mask,
                        Scalar* out) {
  for (int64_t k = 0; k < n; ++k)
    for (int64_t j = 0; j < U; ++j) out[k * U + j] = h[k * ld + j] * mask[k * ld_mask + j];
}

// forward_loop for one chunk of the batch rows
template <typename Scalar>
void forward_rows(const Forward<Scalar>& a, const SequenceOptions& o, const RowLayout& L, const Chunk& ch) {
  const int64_t nr = ch.count, Tn = a.steps, U = a.units, GU = 3 * U;
  const int64_t ld = L.chunk_stride(ch), ldg = ld * GU;  // a step's rows of the chunk: ld buffer rows apart
  const bool save = a.h_prev != nullptr;
  const Scalar* R = a.recurrent_kernel;
  // the chunk's rows of the dropout masks: row k of gate g at rd + g * gate_stride + k * ld_mask
  const Scalar* rd = a.recurrent_dropout ? a.recurrent_dropout + ch.first * U : nullptr;
  const int64_t gate_stride = a.batch * U, ld_mask = ch.stride * U;
  StateRows<Scalar> state(a.h_prev, a.h_last, a.h0, L, ch, Tn, U);
  // z | r take both bias rows, the candidate's input part the input row (its recurrent part is
  // added to h R_h, inside the reset gate's product)
  std::vector<Scalar> bias(GU, Scalar(0)), candidate_bias(U, Scalar(0));
  if (a.input_bias) std::copy(a.input_bias, a.input_bias + GU, bias.begin());
  if (o.reset_after && a.recurrent_bias) {
    for (int64_t j = 0; j < 2 * U; ++j) bias[j] += a.recurrent_bias[j];
    std::copy(a.recurrent_bias + 2 * U, a.recurrent_bias + GU, candidate_bias.begin());
  }
  std::vector<Scalar> masked_h(rd ? nr * U : 0);
  // reset_after: h R of the step [nr,3U]; else r * h of the step when it is not saved [nr,U]
  std::vector<Scalar> scratch(o.reset_after ? nr * GU : (save ? 0 : nr * U));
  // (recurrent dropout: a product per gate, on masked copies of h)
  const uint16_t* R_low = a.recurrent_kernel_low;
  const StepProduct<Scalar> product_all(nr, o.reset_after ? GU : 2 * U, U, R, GU, rd ? 0 : Tn, o.operand, R_low);
  const StepProduct<Scalar> product_candidate(nr, U, U, R + 2 * U, GU, o.reset_after ? 0 : Tn, o.operand,
                                              R_low ? R_low + 2 * U : nullptr);

  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t na = L.taking(ch, s);  // the chunk's rows [0, na) take this step
    if (na == 0) break;                  // (packed: nor any later one)
    const int64_t first = L.row(ch.first, s), out_first = L.output_row(ch.first, s);
    int64_t ldh;
    const Scalar* hp = state.before(s, ldh);
    const NewStates<Scalar> hn = state.after(s);
    const int64_t next_first = hn.continuing ? L.row(ch.first, s + 1) : 0;
    const int64_t next_out_first = hn.continuing ? L.output_row(ch.first, s + 1) : 0;
    Scalar* g_t = a.gates + first * GU;
    auto prefetch_next = [&](int64_t k) {  // the row's buffers at the next step, for writing
      if (k >= hn.continuing) return;
      const int64_t next = next_first + k * ld;
      prefetch_write(a.gates + next * GU, GU);
      if (save) prefetch_write(a.candidate_input + next * U, U);
      if (o.return_sequences) prefetch_write(a.y + (next_out_first + k * ld) * U, U);
    };
    auto finish_row = [&](int64_t k, const Scalar* zr, const Scalar* hpr) {
      Scalar* yrow = output_row(a.y, ch, k, out_first + k * ld, U, o.return_sequences);
      Scalar* hnr = hn.row(k);
      if (a.keep == nullptr || a.keep[first + k * ld]) {
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
        product_all.set(na, hp, ldh, rec, GU);
      } else {
        for (int64_t g = 0; g < 3; ++g) {
          masked_rows(na, U, hp, ldh, rd + g * gate_stride, ld_mask, masked_h.data());
          round_operands(o.operand, masked_h.data(), na * U);
          mm_set<Scalar>(na, U, U, masked_h.data(), U, R + g * U, GU, rec + g * U, GU);
        }
      }
      over_rows(na, 8 * U, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          prefetch_next(k);
          Scalar* zr = g_t + k * ldg;
          Scalar* recr = rec + k * GU;
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
          if (save) std::memcpy(a.candidate_input + (first + k * ld) * U, hh, U * sizeof(Scalar));
          finish_row(k, zr, hp + k * ldh);
        }
      });
    } else {
      if (rd == nullptr) {
        product_all.acc(na, hp, ldh, g_t, ldg);
      } else {
        for (int64_t g = 0; g < 2; ++g) {
          masked_rows(na, U, hp, ldh, rd + g * gate_stride, ld_mask, masked_h.data());
          round_operands(o.operand, masked_h.data(), na * U);
          mm_acc<Scalar>(na, U, U, masked_h.data(), U, R + g * U, GU, g_t + g * U, ldg);
        }
      }
      Scalar* rh = save ? a.candidate_input + first * U : scratch.data();  // r * h * dropout_h
      const int64_t ldr = save ? ld * U : U;
      const Scalar* mask_h = rd ? rd + 2 * gate_stride : nullptr;
      over_rows(na, 4 * U, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          Scalar* zr = g_t + k * ldg;
          for (int64_t j = 0; j < 2 * U; ++j) zr[j] += bias[j];
          act_inplace(o.recurrent_activation, zr, 2 * U);
          const Scalar* r = zr + U;
          const Scalar* hpr = hp + k * ldh;
          Scalar* rhr = rh + k * ldr;
          for (int64_t j = 0; j < U; ++j) rhr[j] = r[j] * hpr[j];
          if (mask_h)
            for (int64_t j = 0; j < U; ++j) rhr[j] *= mask_h[k * ld_mask + j];
          round_operands(o.operand, rhr, U);
        }
      });
      product_candidate.acc(na, rh, ldr, g_t + 2 * U, ldg);
      over_rows(na, 4 * U, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          prefetch_next(k);
          Scalar* zr = g_t + k * ldg;
          Scalar* xh = zr + 2 * U;
          for (int64_t j = 0; j < U; ++j) xh[j] += bias[2 * U + j];
          act_inplace(o.activation, xh, U);
          finish_row(k, zr, hp + k * ldh);
        }
      });
    }
  }
}

// backward_loop for one chunk of the batch rows
template <typename Scalar>
void backward_rows(const Backward<Scalar>& a, const SequenceOptions& o, const RowLayout& L, const Chunk& ch) {
  const int64_t nr = ch.count, Tn = a.steps, U = a.units, GU = 3 * U;
  const int64_t ld = L.chunk_stride(ch);  // a step's rows of the chunk: ld buffer rows apart
  const int64_t width = o.reset_after ? 4 * U : 3 * U, ldz = ld * width;
  const Scalar* RT = a.recurrent_kernel_t;
  // the chunk's rows of the [B,*] buffers: row k of dh at dh + k * ld_batch, of gate g's dropout
  // mask at rd + g * gate_stride + k * ld_batch, of bias_rows at bias_rows + k * ld_bias
  const int64_t gate_stride = a.batch * U, ld_batch = ch.stride * U, ld_bias = ch.stride * width;
  const Scalar* rd = a.recurrent_dropout ? a.recurrent_dropout + ch.first * U : nullptr;
  Scalar* dh = a.dh + ch.first * U;
  Scalar* bias_rows = a.bias_rows ? a.bias_rows + ch.first * width : nullptr;
  const bool carry_on = a.keep != nullptr && !o.zero_output_for_mask;
  std::vector<Scalar> carry(carry_on ? nr * U : 0, Scalar(0));
  std::vector<Scalar> dh_prev(nr * U), product(rd || !o.reset_after ? nr * U : 0);
  // per row: dL/dh_new, then act' of z, r and h_tilde
  std::vector<Scalar> rows_scratch(nr * 4 * U);
  // dh_prev += dz_rec @ RT: reset_after all three blocks at once (dz's first 3U columns), else z | r
  const uint16_t* RT_low = a.recurrent_kernel_t_low;
  const StepProduct<Scalar> product_rec(nr, U, o.reset_after ? GU : 2 * U, RT, U, rd ? 0 : Tn, o.operand, RT_low);
  const StepProduct<Scalar> product_candidate(nr, U, U, RT + 2 * U * U, U, o.reset_after ? 0 : Tn, o.operand,
                                              RT_low ? RT_low + 2 * U * U : nullptr);
  auto kept = [&](int64_t row) { return a.keep == nullptr || a.keep[row]; };

  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t na = L.taking(ch, s);  // the chunk's rows [0, na) took this step
    if (na == 0) continue;               // (packed: the chunk's rows all ended before it)
    const int64_t first = L.row(ch.first, s), out_first = L.output_row(ch.first, s);
    // the step processed next (earlier in time; every row that took step s took it)
    const int64_t next_first = s > 0 ? L.row(ch.first, s - 1) : 0;
    Scalar* dz_t = a.dz + first * width;
    // dL/dh_new, the direct part of dh_prev (dh_new * z), and dz where it needs no product
    auto first_pass = [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t row = first + k * ld;
        if (s > 0) {
          const int64_t next = next_first + k * ld;
          prefetch_read(a.gates + next * GU, GU);
          prefetch_read(a.h_prev + next * U, U);
          prefetch_read(a.candidate_input + next * U, U);
          prefetch_write(a.dz + next * width, width);
        }
        Scalar* d = dz_t + k * ldz;
        Scalar* dhp = dh_prev.data() + k * U;
        const Scalar* dyr = output_grad_row(a.dy, L, ch, k, s, out_first + k * ld, Tn, U, o.return_sequences);
        if (!kept(row)) {
          std::memset(d, 0, width * sizeof(Scalar));
          std::memset(dhp, 0, U * sizeof(Scalar));
          if (carry_on && dyr)
            for (int64_t j = 0; j < U; ++j) carry[k * U + j] += dyr[j];
          continue;
        }
        Scalar* dhn = rows_scratch.data() + k * 4 * U;
        Scalar* dz_act = dhn + U;
        Scalar* dr_act = dhn + 2 * U;
        Scalar* dh_act = dhn + 3 * U;
        state_grad_row(dh + k * ld_batch, dyr, carry_on ? carry.data() + k * U : nullptr, dhn, U);
        const Scalar* z = a.gates + row * GU;
        const Scalar* r = z + U;
        const Scalar* ht = z + 2 * U;
        const Scalar* hp = a.h_prev + row * U;
        dact_arr(o.recurrent_activation, z, dz_act, U);
        dact_arr(o.recurrent_activation, r, dr_act, U);
        dact_arr(o.activation, ht, dh_act, U);
        if (o.reset_after) {
          const Scalar* hh = a.candidate_input + row * U;
          for (int64_t j = 0; j < U; ++j) {
            const Scalar dah = dhn[j] * (Scalar(1) - z[j]) * dh_act[j];
            d[j] = dah * r[j];
            d[U + j] = dhn[j] * (hp[j] - ht[j]) * dz_act[j];
            d[2 * U + j] = dah * hh[j] * dr_act[j];
            d[3 * U + j] = dah;
            dhp[j] = dhn[j] * z[j];
          }
          if (bias_rows)
            for (int64_t j = 0; j < width; ++j) bias_rows[k * ld_bias + j] += d[j];
        } else {
          for (int64_t j = 0; j < U; ++j) {
            d[j] = dhn[j] * (hp[j] - ht[j]) * dz_act[j];
            d[2 * U + j] = dhn[j] * (Scalar(1) - z[j]) * dh_act[j];
            dhp[j] = dhn[j] * z[j];
          }
        }
      }
    };
    over_rows(na, 12 * U, first_pass);
    if (!o.reset_after) {
      // d(r * h * dropout_h) = dh_tilde R_h^T, then dr and the candidate's part of dh_prev
      Scalar* d_rh = product.data();
      product_candidate.set(na, dz_t + 2 * U, ldz, d_rh, U);
      const Scalar* mask_h = rd ? rd + 2 * gate_stride : nullptr;
      over_rows(na, 4 * U, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t row = first + k * ld;
          if (!kept(row)) continue;
          Scalar* d = dz_t + k * ldz;
          Scalar* dhp = dh_prev.data() + k * U;
          Scalar* v = d_rh + k * U;
          if (mask_h)
            for (int64_t j = 0; j < U; ++j) v[j] *= mask_h[k * ld_batch + j];
          const Scalar* r = a.gates + row * GU + U;
          const Scalar* dr_act = rows_scratch.data() + k * 4 * U + 2 * U;
          const Scalar* hp = a.h_prev + row * U;
          for (int64_t j = 0; j < U; ++j) {
            d[U + j] = v[j] * hp[j] * dr_act[j];
            dhp[j] += v[j] * r[j];
          }
          if (bias_rows)
            for (int64_t j = 0; j < width; ++j) bias_rows[k * ld_bias + j] += d[j];
        }
      });
    }
    if (rd == nullptr) {
      product_rec.acc(na, dz_t, ldz, dh_prev.data(), U);
    } else {
      // block b of dz against block b of RT, times the keep-mask of its gate
      const int64_t blocks = o.reset_after ? 3 : 2;
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t gate = o.reset_after ? (block + 2) % 3 : block;  // reset_after: blocks h | z | r
        mm_set<Scalar>(na, U, U, dz_t + block * U, ldz, RT + block * U * U, U, product.data(), U);
        const Scalar* m = rd + gate * gate_stride;
        for (int64_t k = 0; k < na; ++k)
          for (int64_t j = 0; j < U; ++j) dh_prev[k * U + j] += product[k * U + j] * m[k * ld_batch + j];
      }
    }
    for (int64_t k = 0; k < na; ++k)
      if (kept(first + k * ld)) std::memcpy(dh + k * ld_batch, dh_prev.data() + k * U, U * sizeof(Scalar));
  }
}

}  // namespace

template <typename Scalar>
void forward_loop(const Forward<Scalar>& a, const SequenceOptions& o) {
  const RowLayout L(a.batch_sizes, a.batch, a.steps, o.go_backwards);
  const int64_t chunks = chunk_count(a.batch, a.units * 3 * a.units);
  run_chunks(chunks, [&](int64_t c) { forward_rows(a, o, L, L.chunk(c, chunks)); });
}

template <typename Scalar>
void backward_loop(const Backward<Scalar>& a, const SequenceOptions& o) {
  const RowLayout L(a.batch_sizes, a.batch, a.steps, o.go_backwards);
  const int64_t chunks = chunk_count(a.batch, a.units * 3 * a.units);
  run_chunks(chunks, [&](int64_t c) { backward_rows(a, o, L, L.chunk(c, chunks)); });
}

template void forward_loop<float>(const Forward<float>&, const SequenceOptions&);
template void forward_loop<double>(const Forward<double>&, const SequenceOptions&);
template void backward_loop<float>(const Backward<float>&, const SequenceOptions&);
template void backward_loop<double>(const Backward<double>&, const SequenceOptions&);

}  // namespace gru
}  // namespace lstm_core
