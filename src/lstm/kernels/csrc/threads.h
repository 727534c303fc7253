// Threads of the kernel core: torch's own pool (at::parallel_for), so the kernels and torch's
// ops share one OpenMP runtime and torch.set_num_threads governs both.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace lstm_core {

// Denormal floats flushed to zero (MXCSR FTZ and DAZ) while a kernel runs on this thread, as
// TensorFlow's thread pools run Keras: a gradient that decays over hundreds of steps otherwise
// crawls through denormals, and so do the products over all steps that read it (measured:
// training 16,500,32,128 with the loss on the last output, 245 ms without, 18 ms with).
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
};

// FlushDenormals on every thread of ATen's pool for a scope, for MKL's threaded products over all
// steps (MKL runs them on the same OpenMP threads): a backward's products read gradients that small
class FlushDenormalsOnPool {
 public:
  FlushDenormalsOnPool() : flush_(at::in_parallel_region() ? 0 : at::get_num_threads()) {
    at::parallel_for(0, static_cast<int64_t>(flush_.size()), 1, [&](int64_t, int64_t) {
      flush_[at::get_thread_num()].emplace();
    });
  }
  ~FlushDenormalsOnPool() {
    at::parallel_for(0, static_cast<int64_t>(flush_.size()), 1, [&](int64_t, int64_t) {
      flush_[at::get_thread_num()].reset();
    });
  }

 private:
  std::vector<std::optional<FlushDenormals>> flush_;
};

// Run f(b0, b1) over the batch rows, in parallel only when a step is big enough.
constexpr int64_t kParallelWork = 1 << 14;  // elements of gate math per step
template <typename F>
inline void over_rows(int64_t B, int64_t work_per_row, const F& f) {
  if (B * work_per_row >= kParallelWork && B > 1 && at::get_num_threads() > 1) {
    int64_t grain = std::max<int64_t>(1, kParallelWork / 4 / std::max<int64_t>(work_per_row, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      const FlushDenormals flush;
      f(b0, b1);
    });
  } else {
    const FlushDenormals flush;
    f(0, B);
  }
}

// The recurrence is independent across batch rows: with several threads, each runs the whole
// sequence for its share of the rows (single-threaded BLAS inside), so the steps need no
// synchronisation at all. One thread, or one row: the caller's thread.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
constexpr int64_t kMinChunkRows = 2;  // two rows are worth a thread each (measured: 2,80,100,64 inference 261 -> 213 us, training 892 -> 778 us at 2 threads)
// Only while a chunk's per-step GEMM is small: big steps go faster on MKL's own threads
// (measured on 2 cores: 64,100,128,256 inference 32 ms on MKL threads vs 57 ms in chunks).
constexpr int64_t kChunkMaxWork = 2 << 20;  // multiply-adds of one chunk's step
// How many chunks a batch of B rows is run in (1: on the caller's thread, products on MKL's threads).
inline int64_t chunk_count(int64_t B, int64_t work_per_row) {
  int64_t chunks = B >= kMinChunkRows ? std::min<int64_t>(at::get_num_threads(), B) : 1;
  if (chunks > 1 && (B / chunks) * work_per_row > kChunkMaxWork) chunks = 1;
  return at::in_parallel_region() ? 1 : std::max<int64_t>(chunks, 1);
}

// Run f(c) for each chunk c < chunks, a thread each (single-threaded BLAS inside)
template <typename F>
inline void run_chunks(int64_t chunks, const F& f) {
  if (chunks <= 1) {
    const FlushDenormals flush;
    f(int64_t(0));
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const FlushDenormals flush;
    int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t c = c0; c < c1; ++c) f(c);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  });
}

// Run f(b0, b1) over the chunks of a batch of B rows, each a range of consecutive rows
template <typename F>
inline void over_chunks(int64_t B, int64_t work_per_row, const F& f) {
  const int64_t chunks = chunk_count(B, work_per_row);
  run_chunks(chunks, [&](int64_t c) { f(c * B / chunks, (c + 1) * B / chunks); });
}

}  // namespace lstm_core
