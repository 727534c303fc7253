// The GRU's torch bindings (bindings.h: gru_forward, gru_backward): checks, buffers from
// the pool, the input projection and weight-gradient GEMMs over all steps (products.h), and the
// recurrence (rnn.h: gru::forward_loop, gru::backward_loop), batch-major or packed (layout.h).

#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/layout.h"
#include "bindings/optional_tensor.h"
#include "bindings/products.h"
#include "buffer_pool.h"
#include "low_precision.h"
#include "rnn.h"
#include "threads.h"

using namespace lstm_core;
using namespace lstm_bindings;

std::vector<torch::Tensor> gru_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor recurrent_kernel,
                                       c10::optional<torch::Tensor> bias_o, torch::Tensor h0,
                                       c10::optional<torch::Tensor> input_dropout_o,
                                       c10::optional<torch::Tensor> recurrent_dropout_o,
                                       c10::optional<torch::Tensor> mask_o,
                                       c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                       bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                       int64_t recurrent_activation, bool reset_after, bool save,
                                       int64_t operand) {
  at::NoGradGuard no_grad;  // autograd is the caller's (a hand-derived backward)
  // with low-precision operands x and h0 come in the compute dtype, the weights in theirs: the loop
  // runs in float32 on their rounded values, and y and h_last go back to the compute dtype
  const auto compute = x.scalar_type(), loop_type = operand ? torch::kFloat : compute;
  x = x.contiguous();
  kernel = kernel.contiguous();
  const LoopOperand recurrent(recurrent_kernel, operand);
  h0 = operand ? rounded_to_operand(h0, operand) : h0.contiguous();
  auto bias = in_type(opt(bias_o), loop_type), input_dropout = in_type(opt(input_dropout_o), loop_type);
  auto recurrent_dropout = in_type(opt(recurrent_dropout_o), loop_type), mask = opt(mask_o);
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();
  const SequenceOptions options{go_backwards, zero_output_for_mask, return_sequences, static_cast<int>(activation),
                                static_cast<int>(recurrent_activation), reset_after, static_cast<int>(operand)};
  const Layout n = layout_of(x, opt(batch_sizes_o));
  check_packed(n, mask, go_backwards, "gru_forward");
  const int64_t B = n.B, Tn = n.Tn, U = recurrent.values.size(0), XB = n.rows, XT = n.columns;
  auto opts = x.options().dtype(loop_type);
  auto gates = project_inputs(x, kernel, input_dropout, operand);
  torch::Tensor input_bias, recurrent_bias;
  if (bias.defined() && bias.dim() == 2) {
    input_bias = bias[0].contiguous();
    if (reset_after) recurrent_bias = bias[1].contiguous();
  } else if (bias.defined()) {
    input_bias = bias.contiguous();
  }
  auto y = return_sequences ? buffer_pool::empty({XB, XT, U}, opts) : torch::empty({B, U}, opts);
  auto h_last = torch::empty({B, U}, opts);
  torch::Tensor h_prev, candidate_input;
  if (save) {
    h_prev = buffer_pool::empty({XB, XT, U}, opts);
    candidate_input = buffer_pool::empty({XB, XT, U}, opts);
  }
  if (Tn == 0) {
    h_last.copy_(h0);
    y.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(loop_type, "gru_forward", [&] {
      using Scalar = scalar_t;
      auto ptr = [](const torch::Tensor& t) { return t.defined() ? t.data_ptr<Scalar>() : nullptr; };
      const gru::Forward<Scalar> args{B, Tn, U, ptr(gates), ptr(input_bias), ptr(recurrent_bias),
                                      ptr(recurrent.values), ptr(recurrent_dropout),
                                      mask.defined() ? mask.data_ptr<bool>() : nullptr, ptr(h0), ptr(y), ptr(h_last),
                                      ptr(h_prev), ptr(candidate_input),
                                      recurrent.bits_or_null(), n.batch_sizes};
      gru::forward_loop(args, options);
    });
  }
  if (operand) {
    y = y.to(compute);
    h_last = h_last.to(compute);
  }
  if (!save) return {y, h_last};
  return {y, h_last, gates, h_prev, candidate_input};
}

std::vector<torch::Tensor> gru_backward(c10::optional<torch::Tensor> dy_o, c10::optional<torch::Tensor> dh_last_o,
                                        torch::Tensor x, torch::Tensor kernel, torch::Tensor recurrent_kernel,
                                        int64_t bias_dim, torch::Tensor gates, torch::Tensor h_prev,
                                        torch::Tensor candidate_input, c10::optional<torch::Tensor> input_dropout_o,
                                        c10::optional<torch::Tensor> recurrent_dropout_o,
                                        c10::optional<torch::Tensor> mask_o,
                                        c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                        bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                        int64_t recurrent_activation, bool reset_after, std::vector<bool> needs,
                                        int64_t operand) {
  const FlushDenormalsOnPool flush;  // (the products over all steps read small gradients too)
  // needs: x, kernel, recurrent_kernel, bias, h0
  at::NoGradGuard no_grad;
  // (with low-precision operands as the forward: the loop and the saved buffers in float32)
  const auto loop_type = operand ? torch::kFloat : x.scalar_type();
  x = x.contiguous();
  kernel = kernel.contiguous();
  auto dy = opt(dy_o), input_dropout = in_type(opt(input_dropout_o), loop_type);
  auto recurrent_dropout = in_type(opt(recurrent_dropout_o), loop_type), mask = opt(mask_o);
  const SequenceOptions options{go_backwards, zero_output_for_mask, return_sequences, static_cast<int>(activation),
                                static_cast<int>(recurrent_activation), reset_after, static_cast<int>(operand)};
  const Layout n = layout_of(x, opt(batch_sizes_o));
  check_packed(n, mask, go_backwards, "gru_backward");
  const int64_t B = n.B, Tn = n.Tn, U = recurrent_kernel.size(0), XB = n.rows, XT = n.columns;
  const int64_t width = (reset_after ? 4 : 3) * U;
  auto opts = x.options().dtype(loop_type);
  auto dh = dh_last_o.has_value() ? dh_last_o->to(loop_type).contiguous().clone() : torch::zeros({B, U}, opts);
  if (dy.defined()) dy = buffer_pool::contiguous(dy.to(loop_type));
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();
  // reset_after: R^T's blocks in dz's order h | z | r
  auto R = recurrent_kernel;
  const LoopOperand recurrent_t((reset_after ? at::cat({R.narrow(1, 2 * U, U), R.narrow(1, 0, 2 * U)}, 1) : R).t(), operand);
  auto dz = buffer_pool::empty({XB, XT, width}, opts);
  const bool need_bias = needs[3] && bias_dim > 0;
  auto bias_rows = need_bias ? torch::zeros({B, width}, opts) : torch::Tensor();
  if (Tn > 0) {
    AT_DISPATCH_FLOATING_TYPES(loop_type, "gru_backward", [&] {
      using Scalar = scalar_t;
      auto ptr = [](const torch::Tensor& t) { return t.defined() ? t.data_ptr<Scalar>() : nullptr; };
      const gru::Backward<Scalar> args{B, Tn, U, ptr(dy), ptr(gates), ptr(h_prev), ptr(candidate_input),
                                       ptr(recurrent_t.values), ptr(recurrent_dropout),
                                       mask.defined() ? mask.data_ptr<bool>() : nullptr, ptr(dh), ptr(dz),
                                       ptr(bias_rows), recurrent_t.bits_or_null(),
                                       n.batch_sizes};
      gru::backward_loop(args, options);
    });
  }
  auto dz2 = dz.view({XB * XT, width});
  // the input row's dz: dz | dr | dh_tilde (reset_after: after d(h R_h))
  auto dz_x = reset_after ? dz2.narrow(1, U, 3 * U) : dz2;
  torch::Tensor dx, dkernel, drecurrent, dbias;
  input_gradients(dz_x, x, kernel, input_dropout, needs[0], needs[1], dx, dkernel, operand);
  if (needs[2]) {
    // the recurrent row's dz per gate z, r, h and the rows each multiplies
    auto rec_block = [&](int64_t gate) { return dz2.narrow(1, reset_after ? ((gate + 1) % 3) * U : gate * U, U); };
    auto rows_of = [&](int64_t gate) { return !reset_after && gate == 2 ? candidate_input : h_prev; };
    if (!recurrent_dropout.defined() && reset_after) {
      auto all = recurrent_gate_gradient(h_prev, torch::Tensor(), dz2.narrow(1, 0, 3 * U), operand);  // h | z | r
      drecurrent = at::cat({all.narrow(1, U, 2 * U), all.narrow(1, 0, U)}, 1);
    } else if (!recurrent_dropout.defined()) {
      drecurrent = at::cat({recurrent_gate_gradient(h_prev, torch::Tensor(), dz2.narrow(1, 0, 2 * U), operand),
                            recurrent_gate_gradient(candidate_input, torch::Tensor(), rec_block(2), operand)},
                           1);
    } else {
      const auto rows_recurrent_dropout = per_buffer_row(recurrent_dropout, n);
      std::vector<torch::Tensor> parts;
      for (int64_t g = 0; g < 3; ++g) {
        // (reset_after = false: the candidate's rows carry their keep-mask already)
        auto m = !reset_after && g == 2 ? torch::Tensor() : rows_recurrent_dropout[g];
        parts.push_back(recurrent_gate_gradient(rows_of(g), m, rec_block(g), operand));
      }
      drecurrent = at::cat(parts, 1);
    }
  }
  if (need_bias) {
    auto sums = bias_rows.sum(0);
    auto input_row = reset_after ? sums.narrow(0, U, 3 * U) : sums;
    if (bias_dim == 1) {
      dbias = input_row;
    } else {
      auto recurrent_row = reset_after ? at::cat({sums.narrow(0, U, 2 * U), sums.narrow(0, 0, U)})
                                       : torch::zeros_like(sums);  // (reset_after = false ignores bias[1])
      dbias = at::stack({input_row, recurrent_row});
    }
  }
  return {dx, dkernel, drecurrent, dbias, needs[4] ? dh : torch::Tensor()};
}
