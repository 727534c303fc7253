// Where a batch row's buffer row at one step lives, and which rows take the step: the two layouts
// of a sequence's [rows, width] buffers (x @ kernel, the saved gates and states, the outputs).
//
// Batch-major, [B,T,*] (the caller's x): batch row b at time index t is row b*T + t; step s
// processes t = s, or T-1-s going backwards; every row takes every step (a mask says which count).
// Packed (torch's PackedSequence layout, rnn.h Params::batch_sizes): time-major, the batch rows
// sorted by length, longest first; step s holds rows b < batch_sizes[s] at offset_s + b, and only
// those take it, so a pass does work in proportion to the sum of the lengths. A row that takes no
// more steps keeps its state; the caller orders the rows and applies go_backwards (by reversing each
// row's steps), so the packed passes always run forwards and have no mask.
//
// A thread runs the whole sequence for its chunk of the batch rows. Packed, a chunk takes every
// `chunks`-th row (rows sorted by length: consecutive rows would give the first thread the longest).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lstm_core {

// One thread's batch rows: first, first + stride, ... (`count` of them)
struct Chunk {
  int64_t first, stride, count;
  int64_t batch_row(int64_t k) const { return first + k * stride; }
};

class RowLayout {
 public:
  // batch_sizes: [steps] (packed), or nullptr (batch-major)
  RowLayout(const int64_t* batch_sizes, int64_t batch, int64_t steps, bool backwards)
      : batch_sizes_(batch_sizes), batch_(batch), steps_(steps), backwards_(backwards) {
    if (batch_sizes_) {
      offsets_.resize(steps + 1, 0);
      for (int64_t s = 0; s < steps; ++s) offsets_[s + 1] = offsets_[s] + batch_sizes_[s];
    }
  }

  bool packed() const { return batch_sizes_ != nullptr; }
  // the buffer row of batch row b at step s (packed: b < batch_sizes[s])
  int64_t row(int64_t b, int64_t s) const {
    if (packed()) return offsets_[s] + b;
    return b * steps_ + (backwards_ ? steps_ - 1 - s : s);
  }
  // the output row of batch row b at step s: outputs are in processing order
  int64_t output_row(int64_t b, int64_t s) const { return packed() ? offsets_[s] + b : b * steps_ + s; }
  // buffer rows from batch row b to b + 1 at one step
  int64_t batch_stride() const { return packed() ? 1 : steps_; }
  // chunk c of `chunks`
  Chunk chunk(int64_t c, int64_t chunks) const {
    if (packed()) return {c, chunks, c < batch_ ? (batch_ - c + chunks - 1) / chunks : 0};
    const int64_t b0 = c * batch_ / chunks, b1 = (c + 1) * batch_ / chunks;
    return {b0, 1, b1 - b0};
  }
  // how many of the chunk's rows take step s: its first ones
  int64_t taking(const Chunk& ch, int64_t s) const {
    if (!packed()) return ch.count;
    const int64_t n = batch_sizes_[s] - ch.first;
    return n <= 0 ? 0 : std::min(ch.count, (n + ch.stride - 1) / ch.stride);
  }
  // buffer rows between a chunk's consecutive rows at one step (a per-step product's row stride)
  int64_t chunk_stride(const Chunk& ch) const { return ch.stride * batch_stride(); }

 private:
  const int64_t* batch_sizes_;
  int64_t batch_, steps_;
  bool backwards_;
  std::vector<int64_t> offsets_;  // [steps + 1]: the first row of each step
};

}  // namespace lstm_core
