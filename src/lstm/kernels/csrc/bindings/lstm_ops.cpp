// The plain LSTM's torch bindings (bindings.h: lstm_forward, lstm_backward): checks, buffers from
// the pool, the input projection and weight-gradient GEMMs over all steps, and the choice of
// route (a tiny batch's single step, the fused-input inference, the projected recurrence).

#include <torch/types.h>

#include <vector>

#include "bindings/bindings.h"
#include "bindings/optional_tensor.h"
#include "buffer_pool.h"
#include "gemm.h"
#include "rnn.h"

using namespace lstm_core;
using lstm_bindings::opt;

namespace {

// x [B,T,D] @ kernel with input-dropout masks [1|4, B, D] on x; returns [B, T, 4U]. (The bias is
// the recurrence's to add, row by row: addmm first writes the bias over the whole [B*T, 4U]
// output, measured +100 to +160 us at (32,80,100,64), 2 threads, against 0.5 ms for the mm.)
torch::Tensor input_projection(const torch::Tensor& x, const torch::Tensor& kernel, const torch::Tensor& in_drop) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t GU = kernel.size(1), U = GU / 4;
  auto x2 = x.reshape({B * T, D});
  auto project = [&](const torch::Tensor& rows) {  // rows @ kernel into a pooled buffer
    auto out = buffer_pool::empty({B * T, GU}, x.options());
    at::mm_out(out, rows, kernel);
    return out.view({B, T, GU});
  };
  if (!in_drop.defined()) return project(x2);
  if (in_drop.size(0) == 1) return project((x * in_drop[0].unsqueeze(1)).reshape({B * T, D}));
  std::vector<torch::Tensor> parts;
  for (int64_t g = 0; g < 4; ++g) {
    auto xm = (x * in_drop[g].unsqueeze(1)).reshape({B * T, D});
    auto k = kernel.narrow(1, g * U, U);
    parts.push_back(at::mm(xm, k));
  }
  return at::cat(parts, 1).view({B, T, GU});
}

}  // namespace

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
  auto xw = input_projection(x, kernel, in_drop).contiguous();
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
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2), U = R.size(0), GU = 4 * U;
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
  auto x2 = x.view({B * Tn, D});
  if (needs[0]) {
    if (!in_drop.defined() || in_drop.size(0) == 1) {
      dX = buffer_pool::empty({B * Tn, D}, opts);
      at::mm_out(dX, dZ2, kernel.t());
      dX = dX.view({B, Tn, D});
      if (in_drop.defined()) dX.mul_(in_drop[0].unsqueeze(1));
    } else {
      for (int64_t g = 0; g < 4; ++g) {
        auto part = at::mm(dZ2.narrow(1, g * U, U), kernel.narrow(1, g * U, U).t()).view({B, Tn, D}) *
                    in_drop[g].unsqueeze(1);
        dX = g == 0 ? part : dX + part;
      }
    }
  }
  if (needs[1]) {
    if (!in_drop.defined()) {
      dK = at::mm(x2.t(), dZ2);
    } else if (in_drop.size(0) == 1) {
      dK = at::mm((x * in_drop[0].unsqueeze(1)).view({B * Tn, D}).t(), dZ2);
    } else {
      std::vector<torch::Tensor> parts;
      for (int64_t g = 0; g < 4; ++g)
        parts.push_back(at::mm((x * in_drop[g].unsqueeze(1)).view({B * Tn, D}).t(), dZ2.narrow(1, g * U, U)));
      dK = at::cat(parts, 1);
    }
  }
  if (needs[2]) {
    auto H2 = Hp.view({B * Tn, U});
    if (!rec_drop.defined()) {
      dR = at::mm(H2.t(), dZ2);
    } else {
      std::vector<torch::Tensor> parts;
      for (int64_t g = 0; g < 4; ++g)
        parts.push_back(at::mm((Hp * rec_drop[g].unsqueeze(1)).view({B * Tn, U}).t(), dZ2.narrow(1, g * U, U)));
      dR = at::cat(parts, 1);
    }
  }
  if (needs[3]) db = db_rows.sum(0);
  return {dX, dK, dR, db, dh, dc};
}
