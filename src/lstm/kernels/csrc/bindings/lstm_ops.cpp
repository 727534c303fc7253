// The plain LSTM's torch bindings (bindings.h: lstm_forward, lstm_backward): checks, buffers from
// the pool, the input projection and weight-gradient GEMMs over all steps, and the choice of
// route (a tiny batch's single step, the fused-input inference, the projected recurrence).

#include <torch/types.h>

#include <vector>

#include "bindings/bindings.h"
#include "bindings/optional_tensor.h"
#include "bindings/products.h"
#include "buffer_pool.h"
#include "gemm.h"
#include "rnn.h"

using namespace lstm_core;
using lstm_bindings::opt;
using lstm_bindings::input_gradients;
using lstm_bindings::project_inputs;
using lstm_bindings::recurrent_gate_gradient;

std::vector<torch::Tensor> lstm_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor R,
                                        c10::optional<torch::Tensor> bias_o, torch::Tensor h0, torch::Tensor c0,
                                        c10::optional<torch::Tensor> in_drop_o,
                                        c10::optional<torch::Tensor> rec_drop_o,
                                        c10::optional<torch::Tensor> mask_o, bool backwards, bool zero_out,
                                        bool seq, int64_t act, int64_t ract, bool save) {
  at::NoGradGuard no_grad;  // autograd is the caller's (a hand-derived backward)
  x = x.contiguous();
  kernel = kernel.contiguous();
  R = R.contiguous();
  h0 = h0.contiguous();
  c0 = c0.contiguous();
  auto bias = opt(bias_o), in_drop = opt(in_drop_o), rec_drop = opt(rec_drop_o), mask = opt(mask_o);
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();  // (every route reads it as dense [B, T])
  if (!save && x.size(1) == 1 && x.size(0) <= kSmallBatch && !in_drop.defined() && !rec_drop.defined() &&
      (!bias.defined() || bias.is_contiguous()))
    return single_step(x, kernel, R, bias, h0, c0, mask, seq, zero_out, act, ract);
  if (rec_drop.defined()) rec_drop = rec_drop.contiguous();
  const int64_t B = x.size(0), Tn = x.size(1), U = R.size(0);
  lstm::Flags fl{backwards, zero_out, seq, static_cast<int>(act), static_cast<int>(ract)};
  auto opts = x.options();
  if (!save && !in_drop.defined() && !rec_drop.defined() && Tn > 0 &&
      B > kSmallBatch && x.size(2) <= U) {
    // (measured, 2 cores: with D > U the one big projection GEMM wins, e.g. 32,80,100,64
    // 1.44 ms vs 1.66 ms; with D <= U the per-step [x_t, h] GEMM, e.g. 256,50,64,512 136 vs 177 ms)
    auto W = at::cat({kernel, R}, 0).contiguous();
    auto Y = seq ? buffer_pool::empty({B, Tn, U}, opts) : torch::empty({B, U}, opts);
    auto hT = torch::empty({B, U}, opts), cT = torch::empty({B, U}, opts);
    if (bias.defined()) bias = bias.contiguous();
    const int64_t D = x.size(2);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward_xh", [&] {
      using T = scalar_t;
      lstm::ForwardPass<T>(B, Tn, U, fl).run_fused_input(
          D, x.data_ptr<T>(), W.data_ptr<T>(), bias.defined() ? bias.data_ptr<T>() : nullptr,
          mask.defined() ? mask.data_ptr<bool>() : nullptr, h0.data_ptr<T>(), c0.data_ptr<T>(), Y.data_ptr<T>(),
          hT.data_ptr<T>(), cT.data_ptr<T>());
    });
    return {Y, hT, cT};
  }
  // (the bias is the recurrence's to add, row by row: addmm first writes it over the whole
  // [B*T, 4U] output, measured +100 to +160 us at (32,80,100,64), 2 threads, against 0.5 ms for the mm)
  auto xw = project_inputs(x, kernel, in_drop);
  if (bias.defined()) bias = bias.contiguous();
  auto Y = seq ? buffer_pool::empty({B, Tn, U}, opts) : torch::empty({B, U}, opts);
  auto hT = torch::empty({B, U}, opts), cT = torch::empty({B, U}, opts);
  torch::Tensor Hp, Cp;
  if (save) {
    Hp = buffer_pool::empty({B, Tn, U}, opts);
    Cp = buffer_pool::empty({B, Tn, U}, opts);
  }
  if (Tn == 0) {
    hT.copy_(h0);
    cT.copy_(c0);
    Y.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward", [&] {
      using T = scalar_t;
      lstm::ForwardPass<T>(B, Tn, U, fl).run(
          xw.data_ptr<T>(), bias.defined() ? bias.data_ptr<T>() : nullptr, R.data_ptr<T>(),
          rec_drop.defined() ? rec_drop.data_ptr<T>() : nullptr, mask.defined() ? mask.data_ptr<bool>() : nullptr,
          h0.data_ptr<T>(), c0.data_ptr<T>(), Y.data_ptr<T>(), hT.data_ptr<T>(), cT.data_ptr<T>(),
          save ? Hp.data_ptr<T>() : nullptr, save ? Cp.data_ptr<T>() : nullptr);
    });
  }
  if (!save) return {Y, hT, cT};
  return {Y, hT, cT, xw, Hp, Cp};
}

std::vector<torch::Tensor> lstm_backward(c10::optional<torch::Tensor> dY_o, c10::optional<torch::Tensor> dhT_o,
                                         c10::optional<torch::Tensor> dcT_o, torch::Tensor x, torch::Tensor kernel,
                                         torch::Tensor R, torch::Tensor G, torch::Tensor Hp, torch::Tensor Cp,
                                         c10::optional<torch::Tensor> in_drop_o,
                                         c10::optional<torch::Tensor> rec_drop_o,
                                         c10::optional<torch::Tensor> mask_o, bool backwards, bool zero_out, bool seq,
                                         int64_t act, int64_t ract, std::vector<bool> needs) {
  // needs: x, kernel, R, bias, h0, c0
  at::NoGradGuard no_grad;
  auto dY = opt(dY_o), in_drop = opt(in_drop_o), rec_drop = opt(rec_drop_o), mask = opt(mask_o);
  x = x.contiguous();
  kernel = kernel.contiguous();
  const int64_t B = x.size(0), Tn = x.size(1), U = R.size(0), GU = 4 * U;
  lstm::Flags fl{backwards, zero_out, seq, static_cast<int>(act), static_cast<int>(ract)};
  auto opts = x.options();
  auto dh = dhT_o.has_value() ? dhT_o->to(x.scalar_type()).contiguous().clone() : torch::zeros({B, U}, opts);
  auto dc = dcT_o.has_value() ? dcT_o->to(x.scalar_type()).contiguous().clone() : torch::zeros({B, U}, opts);
  if (dY.defined()) dY = buffer_pool::contiguous(dY.to(x.scalar_type()));
  if (rec_drop.defined()) rec_drop = rec_drop.contiguous();
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();
  auto RT = R.t().contiguous();
  auto dZ = buffer_pool::empty({B, Tn, GU}, opts);
  // the bias gradient per batch row, summed over B below (dZ.sum(0) over all B*T rows took 70 to
  // 100 us at (32,80,100,64), 2 threads)
  auto db_rows = needs[3] ? torch::zeros({B, GU}, opts) : torch::Tensor();
  if (Tn > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_backward", [&] {
      using T = scalar_t;
      lstm::BackwardPass<T>(B, Tn, U, fl).run(
          dY.defined() ? dY.data_ptr<T>() : nullptr, G.data_ptr<T>(), Hp.data_ptr<T>(), Cp.data_ptr<T>(),
          RT.data_ptr<T>(), rec_drop.defined() ? rec_drop.data_ptr<T>() : nullptr,
          mask.defined() ? mask.data_ptr<bool>() : nullptr, dh.data_ptr<T>(), dc.data_ptr<T>(), dZ.data_ptr<T>(),
          needs[3] ? db_rows.data_ptr<T>() : nullptr);
    });
  }
  auto dZ2 = dZ.view({B * Tn, GU});
  torch::Tensor dX, dK, dR, db;
  input_gradients(dZ2, x, kernel, in_drop, needs[0], needs[1], dX, dK);
  if (needs[2]) {
    if (!rec_drop.defined()) {
      dR = recurrent_gate_gradient(Hp, torch::Tensor(), dZ2);
    } else {
      std::vector<torch::Tensor> parts;
      for (int64_t g = 0; g < 4; ++g) parts.push_back(recurrent_gate_gradient(Hp, rec_drop[g], dZ2.narrow(1, g * U, U)));
      dR = at::cat(parts, 1);
    }
  }
  if (needs[3]) db = db_rows.sum(0);
  return {dX, dK, dR, db, dh, dc};
}
