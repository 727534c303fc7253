// operands_in_float32 (bindings.h): a low-precision recurrence's tensors as its float32 loop takes them.

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/optional_tensor.h"
#include "low_precision.h"

std::vector<torch::Tensor> operands_in_float32(const std::vector<torch::Tensor>& tensors,
                                               const std::vector<bool>& rounded, int64_t operand) {
  TORCH_CHECK(rounded.size() == tensors.size(), "operands_in_float32: expected a `rounded` flag per tensor");
  TORCH_CHECK(operand == 1 || operand == 2, "operands_in_float32: expected operand 1 (bfloat16) or 2 (float16)");
  const auto op = static_cast<lstm_core::Operand>(operand);
  const auto low = lstm_bindings::operand_type(operand);
  std::vector<torch::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (!t.is_floating_point() || (!rounded[i] && t.scalar_type() == torch::kFloat)) {
      out.push_back(t);
    } else if (!rounded[i] || t.scalar_type() == low) {  // (widening a value of the type is exact)
      out.push_back(t.to(torch::kFloat));
    } else if (t.scalar_type() != torch::kFloat) {  // (float64: rounded once, straight to the type)
      out.push_back(t.to(low).to(torch::kFloat));
    } else {
      const auto source = t.contiguous();
      auto result = at::empty_like(source);
      const float* from = source.data_ptr<float>();
      float* to = result.data_ptr<float>();
      at::parallel_for(0, source.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) to[j] = lstm_core::from_operand(op, lstm_core::to_operand(op, from[j]));
      });
      out.push_back(result);
    }
  }
  return out;
}
