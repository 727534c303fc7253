// The bindings' optional tensor arguments (None from Python) as tensors: undefined when absent.
#pragma once

#include <torch/types.h>

namespace lstm_bindings {

inline torch::Tensor opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

inline torch::Tensor contiguous_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->contiguous() : torch::Tensor();
}

inline torch::Tensor bool_or_none(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->to(torch::kBool).contiguous() : torch::Tensor();
}

}  // namespace lstm_bindings
