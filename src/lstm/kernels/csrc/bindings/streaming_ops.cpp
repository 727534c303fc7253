// The one-step routes' torch bindings (bindings.h): single_step and cell_step (a tiny batch's
// step, lstm::SingleStep) and the LSTMStep class (streaming inference, lstm::StreamingStep),
// which owns its packed weights and state.

#include <torch/types.h>
#include <ATen/EmptyTensor.h>

#include <vector>

#include "bindings/bindings.h"
#include "bindings/optional_tensor.h"
#include "gemm.h"
#include "rnn.h"
#include "small_gemm.h"

using namespace lstm_core;

std::vector<torch::Tensor> single_step(const torch::Tensor& x, const torch::Tensor& kernel, const torch::Tensor& R,
                                       const torch::Tensor& bias, const torch::Tensor& h0, const torch::Tensor& c0,
                                       const torch::Tensor& mask, bool seq, bool zero_out, int64_t act,
                                       int64_t ract) {
  const int64_t B = x.size(0), D = kernel.size(0), U = R.size(0);  // x [B, 1, D] or [B, D]
  auto st = x.scalar_type();
  at::Tensor Y = seq ? at::Tensor(at::detail::empty_cpu({B, 1, U}, st, false))
                     : at::Tensor(at::detail::empty_cpu({B, U}, st, false));
  at::Tensor hT = at::detail::empty_cpu({B, U}, st, false), cT = at::detail::empty_cpu({B, U}, st, false);
  AT_DISPATCH_FLOATING_TYPES(st, "lstm_single_step", [&] {
    using T = scalar_t;
    lstm::SingleStep<T>(B, D, U, static_cast<int>(act), static_cast<int>(ract))
        .run(x.data_ptr<T>(), kernel.data_ptr<T>(), R.data_ptr<T>(), bias.defined() ? bias.data_ptr<T>() : nullptr,
             h0.data_ptr<T>(), c0.data_ptr<T>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, Y.data_ptr<T>(),
             hT.data_ptr<T>(), cT.data_ptr<T>());
  });
  return {Y, hT, cT};
}

std::vector<torch::Tensor> cell_step(const torch::Tensor& x, const c10::optional<torch::Tensor>& h_o,
                                     const c10::optional<torch::Tensor>& c_o, const torch::Tensor& kernel,
                                     const torch::Tensor& R, const c10::optional<torch::Tensor>& bias_o, int64_t act,
                                     int64_t ract) {
  const auto st = kernel.scalar_type();
  if (st != at::kFloat && st != at::kDouble) return {};
  const bool grad = at::GradMode::is_enabled();
  bool needs_grad = false;
  auto plain = [&](const torch::Tensor& t) {
    needs_grad = needs_grad || (grad && t.requires_grad());
    return t.layout() == at::kStrided && !t.is_nested() && t.device().is_cpu() && t.scalar_type() == st;
  };
  if (h_o.has_value() != c_o.has_value() || kernel.dim() != 2 || R.dim() != 2 || x.dim() != 2) return {};
  const int64_t B = x.size(0), D = kernel.size(0), U = R.size(0);
  if (B < 1 || x.size(1) != D || kernel.size(1) != 4 * U || R.size(1) != 4 * U) return {};
  if (!plain(x) || !plain(kernel) || !plain(R)) return {};
  torch::Tensor bias;
  if (bias_o.has_value()) {
    bias = *bias_o;
    if (!plain(bias) || bias.dim() != 1 || bias.size(0) != 4 * U) return {};
  }
  torch::Tensor h, c;
  if (h_o.has_value()) {
    h = *h_o;
    c = *c_o;
    if (!plain(h) || !plain(c) || h.dim() != 2 || c.dim() != 2 || h.size(0) != B || h.size(1) != U ||
        c.size(0) != B || c.size(1) != U)
      return {};
  }
  if (needs_grad) return {torch::Tensor()};
  if (B > kSmallBatch) return {};
  if (!h.defined()) {
    h = at::zeros({B, U}, at::TensorOptions().dtype(st));
    c = at::zeros({B, U}, at::TensorOptions().dtype(st));
  }
  auto dense = [](const torch::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); };
  return single_step(dense(x), dense(kernel), dense(R), bias.defined() ? dense(bias) : bias, dense(h), dense(c),
                     torch::Tensor(), false, false, act, ract);
}

LSTMStep::LSTMStep(torch::Tensor kernel, torch::Tensor rec, c10::optional<torch::Tensor> bias_o, int64_t batch,
                   int64_t act, int64_t ract)
    : kernel_ref_(kernel), rec_ref_(rec), bias_ref_(lstm_bindings::opt(bias_o)), B_(batch), D_(kernel.size(0)),
      U_(rec.size(0)),
      core_(batch, kernel.size(0), rec.size(0),
            kernel.scalar_type() == at::kFloat ? small_gemm::kPanel<float> : small_gemm::kPanel<double>,
            static_cast<int>(act), static_cast<int>(ract)) {
  auto o = kernel.options().requires_grad(false);
  xh_ = torch::zeros({B_, D_ + U_}, o);
  c_ = torch::zeros({B_, U_}, o);
  z_ = torch::empty({B_, core_.panel_count() * core_.panel_width()}, o);
  refresh();
}

// [rows, 4U] gate-major columns -> [P, rows, NB] panels (zero columns past U)
torch::Tensor LSTMStep::pack(const torch::Tensor& w) const {
  const int64_t rows = w.size(0), P = core_.panel_count(), UP = core_.panel_units();
  auto padded = at::constant_pad_nd(w.reshape({rows, 4, U_}), {0, P * UP - U_});
  return padded.view({rows, 4, P, UP}).permute({2, 0, 1, 3}).contiguous().view({P, rows, core_.panel_width()});
}

void LSTMStep::refresh() {
  at::NoGradGuard ng;
  const int64_t P = core_.panel_count(), NB = core_.panel_width();
  W_packed_ = pack(at::cat({kernel_ref_.detach(), rec_ref_.detach()}, 0));
  bias_packed_ = bias_ref_.defined() ? pack(bias_ref_.detach().reshape({1, 4 * U_})).view({P, NB})
                                     : torch::zeros({P, NB}, W_packed_.options());
  kernel_version_ = kernel_ref_._version();
  rec_version_ = rec_ref_._version();
  bias_version_ = bias_ref_.defined() ? bias_ref_._version() : -1;
}

void LSTMStep::set_state(torch::Tensor h, torch::Tensor c) {
  at::NoGradGuard ng;
  xh_.narrow(1, D_, U_).copy_(h);
  c_.copy_(c);
}

std::vector<torch::Tensor> LSTMStep::state() { return {xh_.narrow(1, D_, U_).clone(), c_.clone()}; }

template <typename T>
void LSTMStep::run(const torch::Tensor& x, torch::Tensor& out) {
  core_.run<T>(x.data_ptr<T>(), xh_.data_ptr<T>(), W_packed_.data_ptr<T>(), bias_packed_.data_ptr<T>(),
               z_.data_ptr<T>(), c_.data_ptr<T>(), out.data_ptr<T>());
}

torch::Tensor LSTMStep::step(const torch::Tensor& x) {
  if (x.scalar_type() != W_packed_.scalar_type() || !x.device().is_cpu()) return torch::Tensor();
  TORCH_CHECK_VALUE(x.dim() <= 2 && x.dim() >= 1 && x.size(-1) == D_ && x.numel() == B_ * D_,
                    "x_t: expected shape (", B_, ", ", D_, "), got ", x.sizes());
  if (kernel_ref_._version() != kernel_version_ || rec_ref_._version() != rec_version_ ||
      (bias_ref_.defined() && bias_ref_._version() != bias_version_))
    refresh();
  auto xc = x.is_contiguous() ? x : x.contiguous();
  at::Tensor out = at::detail::empty_cpu({B_, U_}, W_packed_.scalar_type(), false);
  if (W_packed_.scalar_type() == at::kFloat) run<float>(xc, out);
  else run<double>(xc, out);
  return out;
}
