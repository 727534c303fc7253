// The SimpleRNN's recurrences (rnn.h: simple_rnn::forward_loop, simple_rnn::backward_loop), float
// and double. Per step one recurrent GEMM accumulated into the input projection, which the row
// pass activates in place: the step's own outputs, saved for the backward (act' is taken from them).

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
namespace simple_rnn {

template <typename Scalar>
Forward<Scalar> Forward<Scalar>::rows(int64_t b0, int64_t b1, const SequenceOptions& options) const {
  Forward r = *this;
  const int64_t T = steps, U = units;
  r.batch = b1 - b0;
  r.outputs = outputs + b0 * T * U;
  r.recurrent_dropout = recurrent_dropout ? recurrent_dropout + b0 * U : nullptr;
  r.keep = keep ? keep + b0 * T : nullptr;
  r.h0 = h0 + b0 * U;
  r.y = y + b0 * (options.return_sequences ? T : 1) * U;
  r.h_last = h_last + b0 * U;
  r.h_prev = h_prev ? h_prev + b0 * T * U : nullptr;
  return r;
}

template <typename Scalar>
Backward<Scalar> Backward<Scalar>::rows(int64_t b0, int64_t b1, const SequenceOptions& options) const {
  Backward r = *this;
  const int64_t T = steps, U = units;
  r.batch = b1 - b0;
  r.dy = dy ? dy + b0 * (options.return_sequences ? T : 1) * U : nullptr;
  r.outputs = outputs + b0 * T * U;
  r.recurrent_dropout = recurrent_dropout ? recurrent_dropout + b0 * U : nullptr;
  r.keep = keep ? keep + b0 * T : nullptr;
  r.dh = dh + b0 * U;
  r.dz = dz + b0 * T * U;
  r.bias_rows = bias_rows ? bias_rows + b0 * U : nullptr;
  return r;
}

template <typename Scalar>
void forward_loop(const Forward<Scalar>& a, const SequenceOptions& o) {
  const int64_t B = a.batch, Tn = a.steps, U = a.units, ldz = Tn * U;
  const bool save = a.h_prev != nullptr;
  const Scalar* rd = a.recurrent_dropout;
  StateRows<Scalar> state(a.h_prev, a.h_last, a.h0, B, Tn, U, o.go_backwards);
  std::vector<Scalar> masked_h(rd ? B * U : 0);
  const StepProduct<Scalar> product(B, U, U, a.recurrent_kernel, U, Tn, o.operand, a.recurrent_kernel_low);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_index(s, Tn, o.go_backwards);
    const int64_t t_next = o.go_backwards ? t - 1 : t + 1;
    int64_t ldh, ldn;
    const Scalar* hp = state.before(s, ldh);
    Scalar* hn = state.before(s + 1, ldn);
    Scalar* z_t = a.outputs + t * U;
    if (rd == nullptr) {
      product.acc(hp, ldh, z_t, ldz);
    } else {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < U; ++j) masked_h[b * U + j] = hp[b * ldh + j] * rd[b * U + j];
      round_operands(o.operand, masked_h.data(), B * U);
      product.acc(masked_h.data(), U, z_t, ldz);
    }
    over_rows(B, 4 * U, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (s + 1 < Tn) {
          prefetch_write(a.outputs + b * ldz + t_next * U, U);
          if (save && s + 2 < Tn) prefetch_write(a.h_prev + b * ldz + (o.go_backwards ? t_next - 1 : t_next + 1) * U, U);
          if (o.return_sequences) prefetch_write(a.y + (b * Tn + s + 1) * U, U);
        }
        Scalar* zr = z_t + b * ldz;
        if (a.bias)
          for (int64_t j = 0; j < U; ++j) zr[j] += a.bias[j];
        act_inplace(o.activation, zr, U);
        Scalar* yrow = output_row(a.y, b, s, Tn, U, o.return_sequences);
        if (a.keep == nullptr || a.keep[b * Tn + t]) {
          std::memcpy(hn + b * ldn, zr, U * sizeof(Scalar));
          round_operands(o.operand, hn + b * ldn, U);  // (zr, kept as it is, gives the backward act')
          std::memcpy(yrow, hn + b * ldn, U * sizeof(Scalar));
        } else {
          std::memcpy(hn + b * ldn, hp + b * ldh, U * sizeof(Scalar));
          masked_output(yrow, s, U, o);
        }
      }
    });
  }
}

template <typename Scalar>
void backward_loop(const Backward<Scalar>& a, const SequenceOptions& o) {
  const int64_t B = a.batch, Tn = a.steps, U = a.units, ldz = Tn * U;
  const Scalar* rd = a.recurrent_dropout;
  const bool carry_on = a.keep != nullptr && !o.zero_output_for_mask;
  std::vector<Scalar> carry(carry_on ? B * U : 0, Scalar(0)), dh_prev(B * U), dh_new(B * U);
  const StepProduct<Scalar> product(B, U, U, a.recurrent_kernel_t, U, Tn, o.operand, a.recurrent_kernel_t_low);
  auto kept = [&](int64_t b, int64_t t) { return a.keep == nullptr || a.keep[b * Tn + t]; };
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = time_index(s, Tn, o.go_backwards);
    const int64_t t_next = o.go_backwards ? t + 1 : t - 1;
    Scalar* dz_t = a.dz + t * U;
    over_rows(B, 6 * U, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (s > 0) {
          prefetch_read(a.outputs + b * ldz + t_next * U, U);
          prefetch_write(a.dz + b * ldz + t_next * U, U);
        }
        Scalar* d = dz_t + b * ldz;
        const Scalar* dyr = output_grad_row(a.dy, b, s, Tn, U, o.return_sequences);
        if (!kept(b, t)) {
          std::memset(d, 0, U * sizeof(Scalar));
          if (carry_on && dyr)
            for (int64_t j = 0; j < U; ++j) carry[b * U + j] += dyr[j];
          continue;
        }
        Scalar* dhn = dh_new.data() + b * U;
        state_grad_row(a.dh + b * U, dyr, carry_on ? carry.data() + b * U : nullptr, dhn, U);
        dact_arr(o.activation, a.outputs + b * ldz + t * U, d, U);
        for (int64_t j = 0; j < U; ++j) d[j] *= dhn[j];
        if (a.bias_rows)
          for (int64_t j = 0; j < U; ++j) a.bias_rows[b * U + j] += d[j];
      }
    });
    product.set(dz_t, ldz, dh_prev.data(), U);
    for (int64_t b = 0; b < B; ++b) {
      if (!kept(b, t)) continue;
      Scalar* dh = a.dh + b * U;
      const Scalar* p = dh_prev.data() + b * U;
      if (rd)
        for (int64_t j = 0; j < U; ++j) dh[j] = p[j] * rd[b * U + j];
      else
        std::memcpy(dh, p, U * sizeof(Scalar));
    }
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

}  // namespace simple_rnn
}  // namespace lstm_core
