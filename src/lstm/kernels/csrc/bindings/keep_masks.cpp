// Dropout's keep-masks (keep_masks.py): one counter-based draw per element, in parallel.

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cstdint>

#include "bindings/bindings.h"
#include "counter_hash.h"

torch::Tensor keep_mask(int64_t seed, int64_t count, int64_t threshold) {
  TORCH_CHECK(count >= 0 && 0 <= threshold && threshold <= (int64_t{1} << lstm_core::kUniformBits),
              "keep_mask: expected count >= 0 and a threshold in [0, 2^24]");
  auto mask = torch::empty({count}, torch::kFloat);
  float* out = mask.data_ptr<float>();
  at::parallel_for(0, count, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      out[n] = lstm_core::counter_bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(n)) <
                       static_cast<uint64_t>(threshold)
                   ? 1.0f
                   : 0.0f;
  });
  return mask;
}
