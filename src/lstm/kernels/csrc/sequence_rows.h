// Row bookkeeping of the GRU and SimpleRNN loops (gru.cpp, simple_rnn.cpp): the time index of a
// step, where the state before each step lives, and the output and gradient rows of a step.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "rnn.h"

namespace lstm_core {

// the time index that step s processes
inline int64_t time_index(int64_t step, int64_t steps, bool go_backwards) {
  return go_backwards ? steps - 1 - step : step;
}

// Where a forward loop keeps the state before each step: in the saved h_prev [B,T,U] (rows
// T*U apart, so saving costs no copy) or, when nothing is saved, in two [B,U] buffers in turn;
// the state after the last step is h_last [B,U].
template <typename Scalar>
class StateRows {
 public:
  StateRows(Scalar* h_prev, Scalar* h_last, const Scalar* h0, int64_t batch, int64_t steps, int64_t units,
            bool go_backwards)
      : h_prev_(h_prev), h_last_(h_last), steps_(steps), units_(units), go_backwards_(go_backwards),
        buffers_(h_prev ? 0 : 2 * batch * units) {
    int64_t stride;
    Scalar* first = before(0, stride);
    for (int64_t b = 0; b < batch; ++b) std::memcpy(first + b * stride, h0 + b * units, units * sizeof(Scalar));
  }
  // row 0 of the state before step s; `stride` gets the distance between rows
  Scalar* before(int64_t s, int64_t& stride) {
    if (s == steps_) {
      stride = units_;
      return h_last_;
    }
    if (h_prev_) {
      stride = steps_ * units_;
      return h_prev_ + time_index(s, steps_, go_backwards_) * units_;
    }
    stride = units_;
    return buffers_.data() + (s % 2) * (buffers_.size() / 2);
  }

 private:
  Scalar* h_prev_;
  Scalar* h_last_;
  int64_t steps_, units_;
  bool go_backwards_;
  std::vector<Scalar> buffers_;
};

// Step s's output row b: y [B,T,U] in processing order, or the last output [B,U] (rewritten by
// every step that outputs)
template <typename Scalar>
inline Scalar* output_row(Scalar* y, int64_t b, int64_t s, int64_t steps, int64_t units, bool return_sequences) {
  return return_sequences ? y + (b * steps + s) * units : y + b * units;
}

// A masked step's output row: the previous output (zeros before the first step), or zeros
template <typename Scalar>
inline void masked_output(Scalar* row, int64_t s, int64_t units, const SequenceOptions& options) {
  if (options.zero_output_for_mask || s == 0) std::memset(row, 0, units * sizeof(Scalar));
  else if (options.return_sequences) std::memcpy(row, row - units, units * sizeof(Scalar));
}

// dL/dy of step s's row b (dy shaped as y), or null where no gradient reaches it
template <typename Scalar>
inline const Scalar* output_grad_row(const Scalar* dy, int64_t b, int64_t s, int64_t steps, int64_t units,
                                     bool return_sequences) {
  if (dy == nullptr) return nullptr;
  if (return_sequences) return dy + (b * steps + s) * units;
  return s == steps - 1 ? dy + b * units : nullptr;
}

// dL/dh_new of a kept step's row: the state's gradient dh, the output's dy (or null) and `carry`,
// what the masked steps after it passed on through their repeated outputs (cleared here)
template <typename Scalar>
inline void state_grad_row(const Scalar* __restrict__ dh, const Scalar* __restrict__ dy, Scalar* __restrict__ carry,
                           Scalar* __restrict__ out, int64_t units) {
  for (int64_t j = 0; j < units; ++j) out[j] = dh[j];
  if (dy)
    for (int64_t j = 0; j < units; ++j) out[j] += dy[j];
  if (carry)
    for (int64_t j = 0; j < units; ++j) {
      out[j] += carry[j];
      carry[j] = Scalar(0);
    }
}

}  // namespace lstm_core
