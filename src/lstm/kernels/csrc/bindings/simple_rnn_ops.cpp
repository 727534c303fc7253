// The SimpleRNN's torch bindings (bindings.h: simple_rnn_forward, simple_rnn_backward): checks,
// buffers from the pool, the input projection and weight-gradient GEMMs over all steps
// (products.h), and the recurrence (rnn.h: simple_rnn::forward_loop, simple_rnn::backward_loop),
// batch-major or packed (layout.h).

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

std::vector<torch::Tensor> simple_rnn_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor recurrent_kernel,
                                              c10::optional<torch::Tensor> bias_o, torch::Tensor h0,
                                              c10::optional<torch::Tensor> input_dropout_o,
                                              c10::optional<torch::Tensor> recurrent_dropout_o,
                                              c10::optional<torch::Tensor> mask_o,
                                              c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                              bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                              bool save, int64_t operand) {
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
                                0, false, static_cast<int>(operand)};
  const Layout n = layout_of(x, opt(batch_sizes_o));
  check_packed(n, mask, go_backwards, "simple_rnn_forward");
  const int64_t B = n.B, Tn = n.Tn, U = recurrent.values.size(0), XB = n.rows, XT = n.columns;
  auto opts = x.options().dtype(loop_type);
  auto outputs = project_inputs(x, kernel, input_dropout, operand);
  auto y = return_sequences ? buffer_pool::empty({XB, XT, U}, opts) : torch::empty({B, U}, opts);
  auto h_last = torch::empty({B, U}, opts);
  auto h_prev = save ? buffer_pool::empty({XB, XT, U}, opts) : torch::Tensor();
  if (Tn == 0) {
    h_last.copy_(h0);
    y.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(loop_type, "simple_rnn_forward", [&] {
      using Scalar = scalar_t;
      auto ptr = [](const torch::Tensor& t) { return t.defined() ? t.data_ptr<Scalar>() : nullptr; };
      const simple_rnn::Forward<Scalar> args{B, Tn, U, ptr(outputs), ptr(bias), ptr(recurrent.values),
                                             ptr(recurrent_dropout), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                                             ptr(h0), ptr(y), ptr(h_last), ptr(h_prev),
                                             recurrent.bits_or_null(), n.batch_sizes};
      simple_rnn::forward_loop(args, options);
    });
  }
  if (operand) {
    y = y.to(compute);
    h_last = h_last.to(compute);
  }
  if (!save) return {y, h_last};
  return {y, h_last, outputs, h_prev};
}

std::vector<torch::Tensor> simple_rnn_backward(c10::optional<torch::Tensor> dy_o,
                                               c10::optional<torch::Tensor> dh_last_o, torch::Tensor x,
                                               torch::Tensor kernel, torch::Tensor recurrent_kernel, int64_t bias_dim,
                                               torch::Tensor outputs, torch::Tensor h_prev,
                                               c10::optional<torch::Tensor> input_dropout_o,
                                               c10::optional<torch::Tensor> recurrent_dropout_o,
                                               c10::optional<torch::Tensor> mask_o,
                                               c10::optional<torch::Tensor> batch_sizes_o, bool go_backwards,
                                               bool zero_output_for_mask, bool return_sequences, int64_t activation,
                                               std::vector<bool> needs, int64_t operand) {
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
                                0, false, static_cast<int>(operand)};
  const Layout n = layout_of(x, opt(batch_sizes_o));
  check_packed(n, mask, go_backwards, "simple_rnn_backward");
  const int64_t B = n.B, Tn = n.Tn, U = recurrent_kernel.size(0), XB = n.rows, XT = n.columns;
  auto opts = x.options().dtype(loop_type);
  auto dh = dh_last_o.has_value() ? dh_last_o->to(loop_type).contiguous().clone() : torch::zeros({B, U}, opts);
  if (dy.defined()) dy = buffer_pool::contiguous(dy.to(loop_type));
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();
  const LoopOperand recurrent_t(recurrent_kernel.t(), operand);
  auto dz = buffer_pool::empty({XB, XT, U}, opts);
  const bool need_bias = needs[3] && bias_dim > 0;
  auto bias_rows = need_bias ? torch::zeros({B, U}, opts) : torch::Tensor();
  if (Tn > 0) {
    AT_DISPATCH_FLOATING_TYPES(loop_type, "simple_rnn_backward", [&] {
      using Scalar = scalar_t;
      auto ptr = [](const torch::Tensor& t) { return t.defined() ? t.data_ptr<Scalar>() : nullptr; };
      const simple_rnn::Backward<Scalar> args{B, Tn, U, ptr(dy), ptr(outputs), ptr(recurrent_t.values),
                                              ptr(recurrent_dropout), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                                              ptr(dh), ptr(dz), ptr(bias_rows),
                                              recurrent_t.bits_or_null(),
                                              n.batch_sizes};
      simple_rnn::backward_loop(args, options);
    });
  }
  auto dz2 = dz.view({XB * XT, U});
  torch::Tensor dx, dkernel, drecurrent, dbias;
  input_gradients(dz2, x, kernel, input_dropout, needs[0], needs[1], dx, dkernel, operand);
  if (needs[2])
    drecurrent = recurrent_gate_gradient(
        h_prev, recurrent_dropout.defined() ? per_buffer_row(recurrent_dropout, n)[0] : torch::Tensor(), dz2, operand);
  if (need_bias) dbias = bias_rows.sum(0);
  return {dx, dkernel, drecurrent, dbias, needs[4] ? dh : torch::Tensor()};
}
