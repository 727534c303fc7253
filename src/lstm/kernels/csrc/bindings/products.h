// The products over all steps that every cell's bindings share (lstm_ops.cpp, gru_ops.cpp,
// simple_rnn_ops.cpp): the input projection before a forward, the input and recurrent weight
// gradients after a backward.
#pragma once

#include <torch/types.h>

namespace lstm_bindings {

// With `operand` (1 bfloat16, 2 float16) each product has operands in that type (low_precision.h's
// operand_gemm), float32 out:
// x in that type or in float32 holding values rounded to it (as the low-precision recurrences take
// them), the weights rounded to it here, and the other operand (a gradient) rounded to it as
// torch.autocast's backward rounds it.
//
// x [B,T,D] @ kernel [D,G*U] with input-dropout keep-masks [1|G,B,D] (undefined: none) applied to x
// (with `operand`, x after a mask rounded: the product's operand): [B,T,G*U] from the buffer pool
at::Tensor project_inputs(const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& input_dropout,
                          int64_t operand = 0);
// From dz_x [B*T, G*U] (any row stride), the gradient of project_inputs' output: dx [B,T,D] and
// dkernel [D,G*U], each computed only when asked for
void input_gradients(const at::Tensor& dz_x, const at::Tensor& x, const at::Tensor& kernel,
                     const at::Tensor& input_dropout, bool need_x, bool need_kernel, at::Tensor& dx,
                     at::Tensor& dkernel, int64_t operand = 0);
// h [B,T,U] (masks [B,U] applied over T, undefined: none)^T @ dz_g [B*T, U]: [U, U]
at::Tensor recurrent_gate_gradient(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& dz_gate,
                                   int64_t operand = 0);

}  // namespace lstm_bindings
