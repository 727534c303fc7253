// Row bookkeeping of the GRU and SimpleRNN loops (gru.cpp, simple_rnn.cpp), each over one chunk of
// the batch rows (row_layout.h): where the state before each step lives, and the output and
// gradient rows of a step. At one step the chunk's rows taking it are its first ones, a fixed
// number of buffer rows apart (RowLayout::chunk_stride); its rows of a per-batch-row [B,*] buffer
// (h0, h_last, dh, the dropout masks) are Chunk::stride rows apart.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "rnn.h"
#include "row_layout.h"

namespace lstm_core {

// Where the rows of one step write their new states: row k at next + k * ld while it takes the
// next step too (k < continuing), else (its last step) at last + k * last_ld, its row of h_last
template <typename Scalar>
struct NewStates {
  Scalar* next;
  int64_t ld, continuing;
  Scalar* last;
  int64_t last_ld;
  Scalar* row(int64_t k) const { return k < continuing ? next + k * ld : last + k * last_ld; }
};

// Where a chunk's forward loop keeps its rows' state before each step: in the saved h_prev (the
// buffer's rows, so saving costs no copy) or, when nothing is saved, in two [rows, U] buffers in
// turn; a row's state after its last step goes to h_last [B,U].
template <typename Scalar>
class StateRows {
 public:
  StateRows(Scalar* h_prev, Scalar* h_last, const Scalar* h0, const RowLayout& layout, const Chunk& chunk,
            int64_t steps, int64_t units)
      : h_prev_(h_prev), h_last_(h_last), layout_(layout), chunk_(chunk), steps_(steps), units_(units),
        buffers_(h_prev ? 0 : 2 * chunk.count * units) {
    int64_t ld;
    Scalar* first = before(0, ld);  // (every row of a chunk takes the first step)
    for (int64_t k = 0; k < chunk.count; ++k)
      std::memcpy(first + k * ld, h0 + chunk.batch_row(k) * units, units * sizeof(Scalar));
  }
  // row 0 of the state before step s < steps; `ld` gets the distance between rows
  Scalar* before(int64_t s, int64_t& ld) {
    if (h_prev_) {
      ld = layout_.chunk_stride(chunk_) * units_;
      return h_prev_ + layout_.row(chunk_.first, s) * units_;
    }
    ld = units_;
    return buffers_.data() + (s % 2) * (buffers_.size() / 2);
  }
  // where step s's rows write their new states
  NewStates<Scalar> after(int64_t s) {
    NewStates<Scalar> out{nullptr, 0, 0, h_last_ + chunk_.first * units_, chunk_.stride * units_};
    if (s + 1 < steps_) {
      out.next = before(s + 1, out.ld);
      out.continuing = layout_.taking(chunk_, s + 1);
    }
    return out;
  }

 private:
  Scalar* h_prev_;
  Scalar* h_last_;
  const RowLayout& layout_;
  Chunk chunk_;
  int64_t steps_, units_;
  std::vector<Scalar> buffers_;
};

// The output row of the chunk's row k at one step: y [*,U] in processing order at `out_row` (the
// row's RowLayout::output_row), or without return_sequences its row of the last output [B,U]
// (rewritten by every step that outputs)
template <typename Scalar>
inline Scalar* output_row(Scalar* y, const Chunk& chunk, int64_t k, int64_t out_row, int64_t units,
                          bool return_sequences) {
  return y + (return_sequences ? out_row : chunk.batch_row(k)) * units;
}

// A masked step's output row: the previous output (zeros before the first step), or zeros (masks
// come batch-major only: the previous output is the row before)
template <typename Scalar>
inline void masked_output(Scalar* row, int64_t s, int64_t units, const SequenceOptions& options) {
  if (options.zero_output_for_mask || s == 0) std::memset(row, 0, units * sizeof(Scalar));
  else if (options.return_sequences) std::memcpy(row, row - units, units * sizeof(Scalar));
}

// dL/dy of the chunk's row k at step s (dy shaped as y; `out_row` as output_row's), or null where no
// gradient reaches it: without return_sequences only the last step's output has one, and packed the
// caller gives that as dh_last's (a row's last step need not be the call's)
template <typename Scalar>
inline const Scalar* output_grad_row(const Scalar* dy, const RowLayout& layout, const Chunk& chunk, int64_t k,
                                     int64_t s, int64_t out_row, int64_t steps, int64_t units,
                                     bool return_sequences) {
  if (dy == nullptr) return nullptr;
  if (return_sequences) return dy + out_row * units;
  return s == steps - 1 && !layout.packed() ? dy + chunk.batch_row(k) * units : nullptr;
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
