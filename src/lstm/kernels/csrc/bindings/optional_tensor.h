// The bindings' optional tensor arguments (None from Python) as tensors: undefined when absent.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace lstm_bindings {

inline torch::Tensor opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

inline torch::Tensor contiguous_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->contiguous() : torch::Tensor();
}

inline torch::Tensor bool_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->to(torch::kBool).contiguous() : torch::Tensor();
}

// With low-precision operands (1 bfloat16, 2 float16; rnn.h SequenceOptions::operand) a float32
// weight's bits in that type, kept alive in `holder`; else nullptr
inline const uint16_t* operand_bits(const torch::Tensor& weight, int64_t operand, torch::Tensor& holder) {
  if (!operand || weight.scalar_type() != torch::kFloat) return nullptr;
  holder = weight.to(operand == 1 ? torch::kBFloat16 : torch::kHalf).contiguous();
  return static_cast<const uint16_t*>(holder.data_ptr());
}

}  // namespace lstm_bindings
