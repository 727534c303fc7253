// The int8 LSTM's torch bindings (bindings.h: pack_int8, int8_lstm_forward, Int8LSTMStep): checks,
// buffers, and rnn.h's lstm::forward_int8.

#include <torch/types.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/optional_tensor.h"
#include "buffer_pool.h"
#include "int8_product.h"
#include "rnn.h"

using namespace lstm_core;
using lstm_bindings::opt;

namespace {

void check_dense(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), "int8_lstm_forward: ", name,
              ": expected a contiguous CPU tensor of ", c10::toString(dtype), ", got ", t.scalar_type(), " on ",
              t.device());
}

lstm::Flags flags_of(bool backwards, bool zero_out, bool seq, int64_t act, int64_t ract) {
  lstm::Flags flags{};
  flags.backwards = backwards;
  flags.zero_out = zero_out;
  flags.seq = seq;
  flags.act = int(act);
  flags.ract = int(ract);
  return flags;
}

}  // namespace

torch::Tensor pack_int8(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_int8: weight: expected a 2-D tensor, got ", weight.dim(), " dimensions");
  const auto w = weight.contiguous();
  check_dense(w, torch::kChar, "weight");
  const int64_t K = w.size(0), N = w.size(1);
  auto packed = torch::empty({Int8Right::packed_bytes(K, N)}, w.options());
  Int8Right::pack(w.data_ptr<int8_t>(), K, N, packed.data_ptr<int8_t>());
  return packed;
}

std::vector<torch::Tensor> int8_lstm_forward(const torch::Tensor& x_in, const torch::Tensor& kernel,
                                             const torch::Tensor& kernel_scales, const torch::Tensor& recurrent,
                                             const torch::Tensor& recurrent_scales,
                                             const c10::optional<torch::Tensor>& bias_o, const torch::Tensor& h0_in,
                                             const torch::Tensor& c0_in, const c10::optional<torch::Tensor>& mask_o,
                                             bool backwards, bool zero_out, bool seq, int64_t act, int64_t ract) {
  at::NoGradGuard no_grad;
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  auto bias = opt(bias_o), mask = opt(mask_o);
  if (bias.defined()) bias = bias.contiguous();
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2, "int8_lstm_forward: expected x [B,T,D] and h0 [B,U]");
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2), U = h0.size(1), GU = 4 * U;
  for (const auto* t : {&x, &h0, &c0, &kernel_scales, &recurrent_scales})
    check_dense(*t, torch::kFloat, "x, h0, c0 and the scales");
  check_dense(kernel, torch::kChar, "kernel");
  check_dense(recurrent, torch::kChar, "recurrent");
  TORCH_CHECK(kernel.numel() == Int8Right::packed_bytes(D, GU) && recurrent.numel() == Int8Right::packed_bytes(U, GU) &&
                  kernel_scales.numel() == GU && recurrent_scales.numel() == GU && h0.size(0) == B &&
                  c0.sizes() == h0.sizes() && (!bias.defined() || bias.numel() == GU) &&
                  (!mask.defined() || (mask.size(0) == B && mask.size(1) == Tn)),
              "int8_lstm_forward: the weights, states and mask do not fit x ", x.sizes(), " and U = ", U);
  if (bias.defined()) check_dense(bias, torch::kFloat, "bias");
  auto Y = seq ? buffer_pool::empty({B, Tn, U}, x.options()) : torch::empty({B, U}, x.options());
  auto hT = torch::empty({B, U}, x.options()), cT = torch::empty({B, U}, x.options());
  if (Tn == 0) {
    hT.copy_(h0);
    cT.copy_(c0);
    if (!seq) Y.zero_();
    return {Y, hT, cT};
  }
  const lstm::Flags flags = flags_of(backwards, zero_out, seq, act, ract);
  const lstm::Int8Weights weights{kernel.data_ptr<int8_t>(), kernel_scales.data_ptr<float>(),
                                  recurrent.data_ptr<int8_t>(), recurrent_scales.data_ptr<float>(),
                                  bias.defined() ? bias.data_ptr<float>() : nullptr};
  lstm::forward_int8(weights, B, Tn, D, U, x.data_ptr<float>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                     flags, h0.data_ptr<float>(), c0.data_ptr<float>(), Y.data_ptr<float>(), hT.data_ptr<float>(),
                     cT.data_ptr<float>());
  return {Y, hT, cT};
}

Int8LSTMStep::Int8LSTMStep(torch::Tensor kernel, torch::Tensor kernel_scales, torch::Tensor recurrent,
                           torch::Tensor recurrent_scales, c10::optional<torch::Tensor> bias, int64_t input_size,
                           int64_t batch, int64_t activation, int64_t recurrent_activation)
    : kernel_(kernel.contiguous()), kernel_scales_(kernel_scales.contiguous()), recurrent_(recurrent.contiguous()),
      recurrent_scales_(recurrent_scales.contiguous()), B_(batch), D_(input_size), U_(recurrent_scales.numel() / 4),
      flags_(flags_of(false, false, false, activation, recurrent_activation)) {
  at::NoGradGuard no_grad;
  for (const auto* t : {&kernel_scales_, &recurrent_scales_}) check_dense(*t, torch::kFloat, "scales");
  check_dense(kernel_, torch::kChar, "kernel");
  check_dense(recurrent_, torch::kChar, "recurrent");
  TORCH_CHECK(kernel_.numel() == Int8Right::packed_bytes(D_, 4 * U_) &&
                  recurrent_.numel() == Int8Right::packed_bytes(U_, 4 * U_) && kernel_scales_.numel() == 4 * U_,
              "Int8LSTMStep: the packed weights do not fit input_size ", D_, " and U = ", U_);
  if (bias.has_value()) {
    bias_ = bias->detach().contiguous();
    check_dense(bias_, torch::kFloat, "bias");
  }
  h_ = torch::zeros({B_, U_}, kernel_scales_.options());
  c_ = torch::zeros({B_, U_}, kernel_scales_.options());
}

void Int8LSTMStep::set_state(const torch::Tensor& h, const torch::Tensor& c) {
  at::NoGradGuard no_grad;
  h_.copy_(h);
  c_.copy_(c);
}

std::vector<torch::Tensor> Int8LSTMStep::state() const { return {h_.clone(), c_.clone()}; }

torch::Tensor Int8LSTMStep::step(const torch::Tensor& x) {
  if (x.scalar_type() != torch::kFloat || !x.device().is_cpu()) return torch::Tensor();
  TORCH_CHECK_VALUE(x.dim() <= 2 && x.dim() >= 1 && x.size(-1) == D_ && x.numel() == B_ * D_,
                    "x_t: expected shape (", B_, ", ", D_, "), got ", x.sizes());
  const auto xc = x.contiguous();
  auto out = at::detail::empty_cpu({B_, U_}, torch::kFloat, false);
  const lstm::Int8Weights weights{kernel_.data_ptr<int8_t>(), kernel_scales_.data_ptr<float>(),
                                  recurrent_.data_ptr<int8_t>(), recurrent_scales_.data_ptr<float>(),
                                  bias_.defined() ? bias_.data_ptr<float>() : nullptr};
  // (forward_int8 reads the states before it writes them: h_, c_ are both the start and the end)
  lstm::forward_int8(weights, B_, 1, D_, U_, xc.data_ptr<float>(), nullptr, flags_, h_.data_ptr<float>(),
                     c_.data_ptr<float>(), out.data_ptr<float>(), h_.data_ptr<float>(), c_.data_ptr<float>());
  return out;
}
