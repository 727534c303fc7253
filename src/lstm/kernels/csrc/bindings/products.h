// The products over all steps that every cell's bindings share (lstm_ops.cpp, gru_ops.cpp,
// simple_rnn_ops.cpp): the input projection before a forward, the input and recurrent weight
// gradients after a backward.
#pragma once

#include <torch/types.h>

namespace lstm_bindings {

// x [B,T,D] @ kernel [D,G*U] with input-dropout keep-masks [1|G,B,D] (undefined: none) applied to x:
// [B,T,G*U] from the buffer pool
at::Tensor project_inputs(const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& input_dropout);
// From dz_x [B*T, G*U] (any row stride), the gradient of project_inputs' output: dx [B,T,D] and
// dkernel [D,G*U], each computed only when asked for
void input_gradients(const at::Tensor& dz_x, const at::Tensor& x, const at::Tensor& kernel,
                     const at::Tensor& input_dropout, bool need_x, bool need_kernel, at::Tensor& dx,
                     at::Tensor& dkernel);
// h [B,T,U] (masks [B,U] applied over T, undefined: none)^T @ dz_g [B*T, U]: [U, U]
at::Tensor recurrent_gate_gradient(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& dz_gate);

}  // namespace lstm_bindings
