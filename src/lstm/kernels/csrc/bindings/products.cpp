// The cells' products over all steps (products.h): the input projection and the
// weight gradients, on ATen's mm (register tiles for a streaming step's few rows), or with
// low-precision operands on operand_gemm (low_precision.h).

#include <torch/types.h>
#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bindings/products.h"
#include "buffer_pool.h"
#include "gemm.h"
#include "low_precision.h"
#include "small_gemm.h"

namespace lstm_bindings {

using lstm_core::kSmallBatch;
using lstm_core::PanelRight;
using lstm_core::panels_preferred;

namespace {

// t's values in the operand type, contiguous (a float32 tensor of rounded values: exactly)
at::Tensor in_operand_type(const at::Tensor& t, int64_t operand) {
  return t.to(operand == 1 ? at::kBFloat16 : at::kHalf).contiguous();
}

const uint16_t* bits(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

// op(A) [M,K] @ op(B) [K,N] on operand_gemm into a new float32 [M,N] (A, B in the
// operand type, contiguous; trans: stored transposed)
at::Tensor operand_product(int64_t operand, int64_t M, int64_t N, int64_t K, const at::Tensor& A, bool trans_a,
                           const at::Tensor& B, bool trans_b, at::Tensor out = at::Tensor()) {
  if (!out.defined()) out = at::empty({M, N}, A.options().dtype(at::kFloat));
  lstm_core::operand_gemm(lstm_core::Operand(operand), M, N, K, bits(A), trans_a ? M : K, bits(B), trans_b ? K : N,
                          0.0f, out.data_ptr<float>(), N, trans_a, trans_b);
  return out;
}

}  // namespace

at::Tensor project_inputs(const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& input_dropout,
                          int64_t operand) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), GU = kernel.size(1);
  if (operand) {  // (x in float32 holding rounded values, or in the operand type)
    auto out = buffer_pool::empty({B * T, GU}, x.options().dtype(at::kFloat));
    auto kernel_low = in_operand_type(kernel, operand);
    if (!input_dropout.defined()) {
      operand_product(operand, B * T, GU, D, in_operand_type(x, operand), false, kernel_low, false, out);
    } else {  // x after each gate's mask, rounded: the product's operand (as the reference's)
      const int64_t G = input_dropout.size(0), U = GU / G;
      for (int64_t g = 0; g < G; ++g) {
        auto rows = in_operand_type((x * input_dropout[g].unsqueeze(1)).reshape({B * T, D}), operand);
        if (G == 1) operand_product(operand, B * T, GU, D, rows, false, kernel_low, false, out);
        else out.narrow(1, g * U, U).copy_(operand_product(operand, B * T, U, D, rows, false,
                                                            kernel_low.narrow(1, g * U, U).contiguous(), false));
      }
    }
    return out.view({B, T, GU});
  }
  if (B * T <= kSmallBatch && !input_dropout.defined()) {
    // a streaming step's few rows: the register loop, without a torch op (measured: a GRU step at
    // batch 1, D=32, U=64: 11 -> 8 us)
    at::Tensor out = at::detail::empty_cpu({B, T, GU}, x.scalar_type(), false);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "project_inputs", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      std::fill(o, o + B * T * GU, scalar_t(0));
      small_gemm::small_gemm_acc<scalar_t>(B * T, GU, D, x.data_ptr<scalar_t>(), D, kernel.data_ptr<scalar_t>(), GU,
                                           o, GU);
    });
    return out;
  }
  auto out = buffer_pool::empty({B * T, GU}, x.options());
  auto masked = [&](int64_t g) { return (x * input_dropout[g].unsqueeze(1)).reshape({B * T, D}); };
  auto product = [&](const at::Tensor& rows) {  // rows [B*T, D] @ kernel
    if (x.scalar_type() == at::kFloat && panels_preferred() && B * T > kSmallBatch) {
      // (ATen's GEMM is MKL's, which runs its AVX2 code on a CPU that is not Intel's: panel_right.h)
      const auto dense = rows.contiguous(), weights = kernel.contiguous();
      PanelRight(GU, D, weights.data_ptr<float>(), GU).mm(B * T, dense.data_ptr<float>(), D, false,
                                                           out.data_ptr<float>(), GU);
    } else {
      at::mm_out(out, rows, kernel);
    }
  };
  if (!input_dropout.defined()) {
    product(x.reshape({B * T, D}));
  } else if (input_dropout.size(0) == 1) {
    product(masked(0));
  } else {
    const int64_t G = input_dropout.size(0), U = GU / G;
    for (int64_t g = 0; g < G; ++g) {
      auto part = out.narrow(1, g * U, U);  // (BLAS writes it in place: rows GU apart)
      at::mm_out(part, masked(g), kernel.narrow(1, g * U, U));
    }
  }
  return out.view({B, T, GU});
}

void input_gradients(const at::Tensor& dz_x, const at::Tensor& x, const at::Tensor& kernel,
                     const at::Tensor& input_dropout, bool need_x, bool need_kernel, at::Tensor& dx,
                     at::Tensor& dkernel, int64_t operand) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), GU = kernel.size(1);
  if (operand) {
    auto dz = in_operand_type(dz_x, operand), kernel_low = in_operand_type(kernel, operand);
    if (!input_dropout.defined()) {
      if (need_x) dx = operand_product(operand, B * T, D, GU, dz, false, kernel_low, true).view({B, T, D});
      if (need_kernel) dkernel = operand_product(operand, D, GU, B * T, in_operand_type(x, operand), true, dz, false);
      return;
    }
    // per gate's mask: dx = sum_g (dz_g kernel_g^T) * mask_g, dkernel_g = (x * mask_g, rounded)^T dz_g
    const int64_t G = input_dropout.size(0), U = GU / G;
    std::vector<at::Tensor> parts;
    for (int64_t g = 0; g < G; ++g) {
      auto dz_g = G == 1 ? dz : dz.narrow(1, g * U, U).contiguous();
      auto kernel_g = G == 1 ? kernel_low : kernel_low.narrow(1, g * U, U).contiguous();
      auto mask = input_dropout[g].unsqueeze(1);
      if (need_x) {
        auto part = operand_product(operand, B * T, D, U, dz_g, false, kernel_g, true).view({B, T, D}) * mask;
        dx = g == 0 ? part : dx + part;
      }
      if (need_kernel)
        parts.push_back(operand_product(operand, D, U, B * T,
                                        in_operand_type((x * mask).reshape({B * T, D}), operand), true, dz_g, false));
    }
    if (need_kernel) dkernel = G == 1 ? parts[0] : at::cat(parts, 1);
    return;
  }
  const bool per_gate = input_dropout.defined() && input_dropout.size(0) > 1;
  const int64_t G = per_gate ? input_dropout.size(0) : 1, U = GU / G;
  if (need_x) {
    dx = buffer_pool::empty({B * T, D}, x.options());
    if (!per_gate) {
      at::mm_out(dx, dz_x, kernel.t());
      dx = dx.view({B, T, D});
      if (input_dropout.defined()) dx.mul_(input_dropout[0].unsqueeze(1));
    } else {
      dx = dx.view({B, T, D}).zero_();
      for (int64_t g = 0; g < G; ++g)
        dx.addcmul_(at::mm(dz_x.narrow(1, g * U, U), kernel.narrow(1, g * U, U).t()).view({B, T, D}),
                    input_dropout[g].unsqueeze(1));
    }
  }
  if (need_kernel) {
    auto rows_of = [&](int64_t g) {
      return input_dropout.defined() ? (x * input_dropout[g].unsqueeze(1)).reshape({B * T, D}) : x.reshape({B * T, D});
    };
    if (!per_gate) {
      dkernel = at::mm(rows_of(0).t(), dz_x);
    } else {
      std::vector<at::Tensor> parts;
      for (int64_t g = 0; g < G; ++g) parts.push_back(at::mm(rows_of(g).t(), dz_x.narrow(1, g * U, U)));
      dkernel = at::cat(parts, 1);
    }
  }
}

at::Tensor recurrent_gate_gradient(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& dz_gate,
                                   int64_t operand) {
  const int64_t B = h.size(0), T = h.size(1), U = h.size(2);
  auto rows = mask.defined() ? (h * mask.unsqueeze(1)).reshape({B * T, U}) : h.reshape({B * T, U});
  if (operand && h.scalar_type() == at::kFloat)  // (h after its mask rounded, as the forward's operand was)
    return operand_product(operand, U, dz_gate.size(1), B * T, in_operand_type(rows, operand), true,
                           in_operand_type(dz_gate, operand), false);
  return at::mm(rows.t(), dz_gate);
}

}  // namespace lstm_bindings
