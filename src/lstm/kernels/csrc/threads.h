// Threads of the kernel core: torch's own pool (at::parallel_for), so the kernels and torch's
// ops share one OpenMP runtime and torch.set_num_threads governs both.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace lstm_core {

// Run f(b0, b1) over the batch rows, in parallel only when a step is big enough.
constexpr int64_t kParallelWork = 1 << 14;  // elements of gate math per step
template <typename F>
inline void over_rows(int64_t B, int64_t work_per_row, const F& f) {
  if (B * work_per_row >= kParallelWork && B > 1 && at::get_num_threads() > 1) {
    int64_t grain = std::max<int64_t>(1, kParallelWork / 4 / std::max<int64_t>(work_per_row, 1));
    at::parallel_for(0, B, grain, f);
  } else {
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
template <typename F>
inline void over_chunks(int64_t B, int64_t work_per_row, const F& f) {
  const int64_t nt = at::get_num_threads();
  int64_t chunks = B >= kMinChunkRows ? std::min<int64_t>(nt, B) : 1;
  if (chunks > 1 && (B / chunks) * work_per_row > kChunkMaxWork) chunks = 1;
  if (chunks <= 1 || at::in_parallel_region()) {
    f(0, B);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t ch = c0; ch < c1; ++ch) f(ch * B / chunks, (ch + 1) * B / chunks);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  });
}

}  // namespace lstm_core
