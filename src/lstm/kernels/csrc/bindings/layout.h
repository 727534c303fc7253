// A binding call's row layout (row_layout.h), shared by the cells' bindings: batch-major, or packed
// (torch's PackedSequence layout, given by batch_sizes).
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace lstm_bindings {

// A call's layout: batch-major, its buffers [B,T,*] shaped like x [B,T,D]; or packed (batch_sizes
// given), x [N,1,D] and the buffers [N,1,*] (the products over all steps take N rows either way),
// B = batch_sizes[0] rows (each takes the first step), T = its steps.
struct Layout {
  int64_t B, Tn;               // batch rows, steps
  int64_t rows, columns;       // x's first two sizes: each buffer's
  const int64_t* batch_sizes;  // or nullptr
};

inline Layout layout_of(const torch::Tensor& x, const torch::Tensor& batch_sizes) {
  if (!batch_sizes.defined()) return {x.size(0), x.size(1), x.size(0), x.size(1), nullptr};
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.numel() > 0 && batch_sizes.scalar_type() == torch::kLong &&
                  batch_sizes.is_cpu() && batch_sizes.is_contiguous() && x.size(1) == 1,
              "packed call: expected batch_sizes a non-empty int64 [T] and x [N, 1, D]");
  const int64_t* sizes = batch_sizes.data_ptr<int64_t>();
  return {sizes[0], batch_sizes.numel(), x.size(0), 1, sizes};
}

// A packed call runs forwards with no mask (the caller orders the rows and reverses them for
// go_backwards; padding is what it leaves out)
inline void check_packed(const Layout& n, const torch::Tensor& mask, bool go_backwards, const char* call) {
  TORCH_CHECK(!n.batch_sizes || (!mask.defined() && !go_backwards), call,
              ": a packed call (batch_sizes given) takes no mask and runs forwards");
}

// A per-batch-row tensor [G, B, *] as per-buffer-row [G, rows, *] (packed: the batch row of each)
inline torch::Tensor per_buffer_row(const torch::Tensor& per_batch_row, const Layout& n) {
  if (!n.batch_sizes) return per_batch_row;
  auto batch_rows = torch::empty({n.rows}, torch::kLong);
  int64_t* out = batch_rows.data_ptr<int64_t>();
  for (int64_t s = 0; s < n.Tn; ++s)
    for (int64_t b = 0; b < n.batch_sizes[s]; ++b) *out++ = b;
  return per_batch_row.index_select(1, batch_rows.to(per_batch_row.device()));
}

}  // namespace lstm_bindings
