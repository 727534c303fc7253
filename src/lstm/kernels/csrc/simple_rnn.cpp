// The SimpleRNN's recurrences (rnn.h: simple_rnn::forward_loop, simple_rnn::backward_loop), float
// and double. Per step one recurrent GEMM accumulated into the input projection, which the row
// pass activates in place: the step's own outputs, saved for the backward (act' is taken from them).
// Each thread runs every step for its chunk of the rows (row_layout.h): batch-major, or packed,
// where a step's product and row pass take only the rows that take the step.

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
namespace simple_rnn {
namespace {

// forward_loop for one chunk of the batch rows
template <typename Scalar>
void forward_rows(const Forward<Scalar>& a, const SequenceOptions& o, const RowLayout& L, const Chunk& ch) {
  const int64_t nr = ch.count, Tn = a.steps, U = a.units;
  const int64_t ld = L.chunk_stride(ch), ldz = ld * U;  // a step's rows of the chunk: ld buffer rows apart
  const bool save = a.h_prev != nullptr;
  // the chunk's rows of the dropout mask: row k at rd + k * ld_mask
  const Scalar* rd = a.recurrent_dropout ? a.recurrent_dropout + ch.first * U : nullptr;
  const int64_t ld_mask = ch.stride * U;
  StateRows<Scalar> state(a.h_prev, a.h_last, a.h0, L, ch, Tn, U);
  std::vector<Scalar> masked_h(rd ? nr * U : 0);
  const StepProduct<Scalar> product(nr, U, U, a.recurrent_kernel, U, Tn, o.operand, a.recurrent_kernel_low);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t na = L.taking(ch, s);  // the chunk's rows [0, na) take this step
    if (na == 0) break;                  // (packed: nor any later one)
    const int64_t first = L.row(ch.first, s), out_first = L.output_row(ch.first, s);
    int64_t ldh;
    const Scalar* hp = state.before(s, ldh);
    const NewStates<Scalar> hn = state.after(s);
    const int64_t next_first = hn.continuing ? L.row(ch.first, s + 1) : 0;
    const int64_t next_out_first = hn.continuing ? L.output_row(ch.first, s + 1) : 0;
    // the saved state two steps on (the next one's is this step's new state): its rows [0, later)
    const int64_t later = save && s + 2 < Tn ? L.taking(ch, s + 2) : 0;
    const int64_t later_first = later ? L.row(ch.first, s + 2) : 0;
    Scalar* z_t = a.outputs + first * U;
    if (rd == nullptr) {
      product.acc(na, hp, ldh, z_t, ldz);
    } else {
      for (int64_t k = 0; k < na; ++k)
        for (int64_t j = 0; j < U; ++j) masked_h[k * U + j] = hp[k * ldh + j] * rd[k * ld_mask + j];
      round_operands(o.operand, masked_h.data(), na * U);
      product.acc(na, masked_h.data(), U, z_t, ldz);
    }
    over_rows(na, 4 * U, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        if (k < hn.continuing) {  // the row's buffers at the next steps, for writing
          prefetch_write(a.outputs + (next_first + k * ld) * U, U);
          if (k < later) prefetch_write(a.h_prev + (later_first + k * ld) * U, U);
          if (o.return_sequences) prefetch_write(a.y + (next_out_first + k * ld) * U, U);
        }
        Scalar* zr = z_t + k * ldz;
        if (a.bias)
          for (int64_t j = 0; j < U; ++j) zr[j] += a.bias[j];
        act_inplace(o.activation, zr, U);
        Scalar* yrow = output_row(a.y, ch, k, out_first + k * ld, U, o.return_sequences);
        Scalar* hnr = hn.row(k);
        if (a.keep == nullptr || a.keep[first + k * ld]) {
          std::memcpy(hnr, zr, U * sizeof(Scalar));
          round_operands(o.operand, hnr, U);  // (zr, kept as it is, gives the backward act')
          std::memcpy(yrow, hnr, U * sizeof(Scalar));
        } else {
          std::memcpy(hnr, hp + k * ldh, U * sizeof(Scalar));
          masked_output(yrow, s, U, o);
        }
      }
    });
  }
}

// backward_loop for one chunk of the batch rows
template <typename Scalar>
void backward_rows(const Backward<Scalar>& a, const SequenceOptions& o, const RowLayout& L, const Chunk& ch) {
  const int64_t nr = ch.count, Tn = a.steps, U = a.units;
  const int64_t ld = L.chunk_stride(ch), ldz = ld * U;  // a step's rows of the chunk: ld buffer rows apart
  // the chunk's rows of the [B,U] buffers (dh, the dropout mask, bias_rows): ld_batch apart
  const int64_t ld_batch = ch.stride * U;
  const Scalar* rd = a.recurrent_dropout ? a.recurrent_dropout + ch.first * U : nullptr;
  Scalar* dh = a.dh + ch.first * U;
  Scalar* bias_rows = a.bias_rows ? a.bias_rows + ch.first * U : nullptr;
  const bool carry_on = a.keep != nullptr && !o.zero_output_for_mask;
  std::vector<Scalar> carry(carry_on ? nr * U : 0, Scalar(0)), dh_prev(nr * U), dh_new(nr * U);
  const StepProduct<Scalar> product(nr, U, U, a.recurrent_kernel_t, U, Tn, o.operand, a.recurrent_kernel_t_low);
  auto kept = [&](int64_t row) { return a.keep == nullptr || a.keep[row]; };
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t na = L.taking(ch, s);  // the chunk's rows [0, na) took this step
    if (na == 0) continue;               // (packed: the chunk's rows all ended before it)
    const int64_t first = L.row(ch.first, s), out_first = L.output_row(ch.first, s);
    // the step processed next (earlier in time; every row that took step s took it)
    const int64_t next_first = s > 0 ? L.row(ch.first, s - 1) : 0;
    Scalar* dz_t = a.dz + first * U;
    over_rows(na, 6 * U, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t row = first + k * ld;
        if (s > 0) {
          prefetch_read(a.outputs + (next_first + k * ld) * U, U);
          prefetch_write(a.dz + (next_first + k * ld) * U, U);
        }
        Scalar* d = dz_t + k * ldz;
        const Scalar* dyr = output_grad_row(a.dy, L, ch, k, s, out_first + k * ld, Tn, U, o.return_sequences);
        if (!kept(row)) {
          std::memset(d, 0, U * sizeof(Scalar));
          if (carry_on && dyr)
            for (int64_t j = 0; j < U; ++j) carry[k * U + j] += dyr[j];
          continue;
        }
        Scalar* dhn = dh_new.data() + k * U;
        state_grad_row(dh + k * ld_batch, dyr, carry_on ? carry.data() + k * U : nullptr, dhn, U);
        dact_arr(o.activation, a.outputs + row * U, d, U);
        for (int64_t j = 0; j < U; ++j) d[j] *= dhn[j];
        if (bias_rows)
          for (int64_t j = 0; j < U; ++j) bias_rows[k * ld_batch + j] += d[j];
      }
    });
    product.set(na, dz_t, ldz, dh_prev.data(), U);
    for (int64_t k = 0; k < na; ++k) {
      if (!kept(first + k * ld)) continue;
      Scalar* dhk = dh + k * ld_batch;
      const Scalar* p = dh_prev.data() + k * U;
      if (rd)
        for (int64_t j = 0; j < U; ++j) dhk[j] = p[j] * rd[k * ld_batch + j];
      else
        std::memcpy(dhk, p, U * sizeof(Scalar));
    }
  }
}

}  // namespace

template <typename Scalar>
void forward_loop(const Forward<Scalar>& a, const SequenceOptions& o) {
  const RowLayout L(a.batch_sizes, a.batch, a.steps, o.go_backwards);
  const int64_t chunks = chunk_count(a.batch, a.units * a.units);
  run_chunks(chunks, [&](int64_t c) { forward_rows(a, o, L, L.chunk(c, chunks)); });
}

template <typename Scalar>
void backward_loop(const Backward<Scalar>& a, const SequenceOptions& o) {
  const RowLayout L(a.batch_sizes, a.batch, a.steps, o.go_backwards);
  const int64_t chunks = chunk_count(a.batch, a.units * a.units);
  run_chunks(chunks, [&](int64_t c) { backward_rows(a, o, L, L.chunk(c, chunks)); });
}

template void forward_loop<float>(const Forward<float>&, const SequenceOptions&);
template void forward_loop<double>(const Forward<double>&, const SequenceOptions&);
template void backward_loop<float>(const Backward<float>&, const SequenceOptions&);
template void backward_loop<double>(const Backward<double>&, const SequenceOptions&);

}  // namespace simple_rnn
}  // namespace lstm_core
