// The bindings' optional tensor arguments (None from Python) as tensors: undefined when absent.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace lstm_bindings {

inline torch::Tensor opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

inline torch::Tensor contiguous_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->contiguous() : torch::Tensor();
}

// t (undefined allowed) in `type`, contiguous
inline torch::Tensor in_type(const torch::Tensor& t, torch::ScalarType type) {
  return t.defined() ? t.to(type).contiguous() : t;
}

inline torch::Tensor bool_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->to(torch::kBool).contiguous() : torch::Tensor();
}

// The dtype of low-precision operands (1 bfloat16, 2 float16; rnn.h SequenceOptions::operand)
inline torch::ScalarType operand_type(int64_t operand) { return operand == 1 ? torch::kBFloat16 : torch::kHalf; }

// A tensor as a float32 step loop with low-precision operands takes it: its values rounded to the
// operand type, in float32, whatever its dtype (the compute dtype; float32 for the weights of a
// mixed policy). Rounding here, once, spares the Python side two dtype copies of each operand (about
// 6 us each: at batch 2 they cost the GRU's training step as much as its loop's float32 work)
inline torch::Tensor rounded_to_operand(const torch::Tensor& t, int64_t operand) {
  return t.to(operand_type(operand)).to(torch::kFloat).contiguous();
}

// A step loop's right operand W: with low-precision operands `values` holds W's values rounded to
// the operand type in float32 and `bits` the type's own copy (the per-step products on
// operand_right.h's read it); else W itself and no bits
struct LoopOperand {
  torch::Tensor values, bits;
  LoopOperand(const torch::Tensor& weight, int64_t operand) {
    if (!operand) {
      values = weight.contiguous();
      return;
    }
    bits = weight.to(operand_type(operand)).contiguous();
    values = bits.to(torch::kFloat);
  }
  const uint16_t* bits_or_null() const {
    return bits.defined() ? static_cast<const uint16_t*>(bits.data_ptr()) : nullptr;
  }
};

}  // namespace lstm_bindings
