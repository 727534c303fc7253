// The LSTM's torch bindings (bindings.h: lstm_forward, lstm_backward for the plain cell,
// variant_forward, variant_backward for its variants), both on the one recurrence of rnn.h's
// lstm::ForwardPass and BackwardPass: checks, buffers from the pool, the plain cell's input
// projection and weight-gradient GEMMs over all steps, and its choice of route (a tiny batch's
// single step, the fused-input inference, the recurrence). The variants' products over all steps
// are the caller's (fused_variants.py).

#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/layout.h"
#include "bindings/optional_tensor.h"
#include "bindings/products.h"
#include "buffer_pool.h"
#include "gemm.h"
#include "low_precision.h"
#include "rnn.h"
#include "threads.h"

using namespace lstm_core;
using lstm_bindings::bool_or_none;
using lstm_bindings::contiguous_or_none;
using lstm_bindings::input_gradients;
using lstm_bindings::Layout;
using lstm_bindings::layout_of;
using lstm_bindings::opt;
using lstm_bindings::per_buffer_row;
using lstm_bindings::project_inputs;
using lstm_bindings::recurrent_gate_gradient;

namespace {

// A call's weights and masks (undefined: the variant or mask is off)
struct Weights {
  torch::Tensor gate_gain, bias, R, RT, rd, peep, gain_c, shift_c, P, PT, mask;
};

struct Zoneout {  // the seed, the step offset and the two keep thresholds (0: off) of problem.Zoneout
  int64_t seed, offset, keep_h, keep_c;
};

// the raw view of one call's tensors (undefined: nullptr); GU gate columns
template <typename T>
lstm::Params<T> params_of(const Weights& w, const Layout& n, int64_t GU, bool coupled, const Zoneout& zoneout) {
  auto ptr = [](const torch::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
  lstm::Params<T> v;
  v.gain_x = ptr(w.gate_gain);
  v.gain_h = v.gain_x ? v.gain_x + GU : nullptr;
  v.bias = ptr(w.bias);
  v.R = ptr(w.R);
  v.RT = ptr(w.RT);
  v.R_low = v.RT_low = nullptr;
  v.Y_low = v.Hp_low = v.dXW_low = nullptr;
  v.rd = ptr(w.rd);
  v.peep = ptr(w.peep);
  v.gain_c = ptr(w.gain_c);
  v.shift_c = ptr(w.shift_c);
  v.P = ptr(w.P);
  v.PT = ptr(w.PT);
  v.mask = w.mask.defined() ? w.mask.data_ptr<bool>() : nullptr;
  v.zoneout_seed = uint64_t(zoneout.seed);
  v.zoneout_offset = zoneout.offset;
  v.keep_h = uint64_t(zoneout.keep_h);
  v.keep_c = uint64_t(zoneout.keep_c);
  v.batch_sizes = n.batch_sizes;
  v.B = n.B;
  v.Tn = n.Tn;
  v.GU = GU;
  v.G = coupled ? 3 : 4;
  v.U = GU / v.G;
  v.Ps = w.R.defined() ? w.R.size(0) : v.U;  // (no R: the plain cell in low precision, R_low set after)
  return v;
}

constexpr Zoneout kNoZoneout{0, 0, 0, 0};

lstm::Flags plain_flags(bool backwards, bool zero_out, bool seq, int64_t act, int64_t ract, bool save,
                        Operand operand = Operand::native) {
  return {backwards, zero_out, seq,  false, false, false, false, save, static_cast<int>(act), static_cast<int>(ract),
          -1.0,      static_cast<int>(operand)};
}

template <typename T>
T* ptr_or_null(torch::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

bool is_low_precision(const torch::Tensor& x) {
  return x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf;
}

Operand operand_of(const torch::Tensor& x) {
  return x.scalar_type() == torch::kBFloat16 ? Operand::bf16 : Operand::f16;
}

uint16_t* bits_of(const torch::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }

// The plain cell in bfloat16/float16 (problem.py, Recurrence: "Precision"): x in the low precision
// L, the weights in L or float32, h0 in L or float32, c0 in float32 or L. The products take their
// operands in L (x, the weights and h rounded to it) and accumulate in float32 (per step
// operand_right.h's, over all steps MKL's bf16/f16 GEMM); the gates, C and the recurrence in float32. Returns Y, hT in L, cT in float32 and, with
// save, G (float32), Hp (L), Cp (float32). No dropout (the caller's supports() declines it).
std::vector<torch::Tensor> forward_low_precision(const torch::Tensor& x, const torch::Tensor& kernel,
                                                 const torch::Tensor& R, const torch::Tensor& bias,
                                                 const torch::Tensor& h0, const torch::Tensor& c0,
                                                 const torch::Tensor& mask, const Layout& n,
                                                 const lstm::Flags& flags) {
  const auto low = x.scalar_type();
  const Operand operand = operand_of(x);
  const int64_t B = n.B, Tn = n.Tn, D = x.size(2), U = R.size(0), GU = 4 * U, XB = n.rows, XT = n.columns;
  auto f32 = x.options().dtype(torch::kFloat), lowp = x.options();
  auto x_low = x.contiguous(), kernel_low = kernel.to(low).contiguous(), R_low = R.to(low).contiguous();
  auto R_rounded = R_low.to(torch::kFloat);  // (a few rows' products take float's, on the same values)
  auto h0_rounded = h0.to(low).to(torch::kFloat).contiguous(), c0_f32 = c0.to(torch::kFloat).contiguous();
  auto bias_f32 = bias.defined() ? bias.to(torch::kFloat).contiguous() : torch::Tensor();
  auto Y = flags.seq ? buffer_pool::empty({XB, XT, U}, lowp) : torch::empty({B, U}, f32);
  auto hT = torch::empty({B, U}, f32), cT = torch::empty({B, U}, f32);
  torch::Tensor Hp, Cp, xw;  // xw: x @ kernel, then the activated gates G
  if (flags.save) {
    xw = buffer_pool::empty({XB, XT, GU}, f32);
    Hp = buffer_pool::empty({XB, XT, U}, lowp);
    Cp = buffer_pool::empty({XB, XT, U}, f32);
  }
  if (Tn == 0) {
    hT.copy_(h0_rounded);
    cT.copy_(c0_f32);
    Y.zero_();
  } else if (!flags.save && !n.batch_sizes && B > kSmallBatch && D <= U) {  // (as the float route: no [B,T,4U] buffer)
    auto W_low = at::cat({kernel_low, R_low}, 0).contiguous();
    const Weights weights{torch::Tensor(), bias_f32, {}, {}, {}, {}, {}, {}, {}, {}, mask};
    auto params = params_of<float>(weights, n, GU, false, kNoZoneout);
    if (flags.seq) params.Y_low = bits_of(Y);
    lstm::ForwardPass<float>(params, flags)
        .run_fused_input_low(D, bits_of(x_low), bits_of(W_low), h0_rounded.data_ptr<float>(), c0_f32.data_ptr<float>(),
                             flags.seq ? nullptr : Y.data_ptr<float>(), hT.data_ptr<float>(), cT.data_ptr<float>());
  } else {
    if (!xw.defined()) xw = buffer_pool::empty({XB, XT, GU}, f32);
    operand_gemm(operand, XB * XT, GU, D, bits_of(x_low), D, bits_of(kernel_low), GU, 0.0f, xw.data_ptr<float>(), GU);
    const Weights weights{torch::Tensor(), bias_f32, R_rounded, {}, {}, {}, {}, {}, {}, {}, mask};
    auto params = params_of<float>(weights, n, GU, false, kNoZoneout);
    params.R_low = bits_of(R_low);
    if (flags.seq) params.Y_low = bits_of(Y);
    if (flags.save) params.Hp_low = bits_of(Hp);
    const lstm::Saved<float> saved{flags.save ? xw.data_ptr<float>() : nullptr, nullptr, ptr_or_null<float>(Cp)};
    lstm::ForwardPass<float>(params, flags)
        .run(xw.data_ptr<float>(), h0_rounded.data_ptr<float>(), c0_f32.data_ptr<float>(),
             flags.seq ? nullptr : Y.data_ptr<float>(), hT.data_ptr<float>(), cT.data_ptr<float>(), saved, nullptr,
             nullptr);
  }
  std::vector<torch::Tensor> out{Y.to(low), hT.to(low), cT};
  if (flags.save) out.insert(out.end(), {xw, Hp, Cp});
  return out;
}

// The backward of forward_low_precision: the recurrence in float32, each step's dz rounded to L for
// its products (with R^T per step; dx and the weight gradients after), accumulated in float32.
// Every gradient in float32 (the caller casts them to their inputs' dtypes).
std::vector<torch::Tensor> backward_low_precision(const torch::Tensor& dY, const torch::Tensor& dhT,
                                                  const torch::Tensor& dcT, const torch::Tensor& x,
                                                  const torch::Tensor& kernel, const torch::Tensor& R,
                                                  const torch::Tensor& G, const torch::Tensor& Hp,
                                                  const torch::Tensor& Cp, const torch::Tensor& mask,
                                                  const Layout& n, const lstm::Flags& flags,
                                                  const std::vector<bool>& needs) {
  const auto low = x.scalar_type();
  const int64_t B = n.B, Tn = n.Tn, U = R.size(0), GU = 4 * U, XB = n.rows, XT = n.columns;
  auto f32 = x.options().dtype(torch::kFloat);
  auto as_f32 = [](const torch::Tensor& t) {
    return t.defined() ? t.to(torch::kFloat).contiguous() : torch::Tensor();
  };
  auto dY_f32 = as_f32(dY), dhT_f32 = as_f32(dhT), dcT_f32 = as_f32(dcT);
  auto RT_low = R.to(low).t().contiguous();
  auto RT_rounded = RT_low.to(torch::kFloat);  // (a few rows' products take float's, on the same values)
  auto dZ_low = buffer_pool::empty({XB, XT, GU}, x.options());
  auto dh0 = torch::empty({B, U}, f32), dc0 = torch::empty({B, U}, f32);
  auto db = needs[3] ? torch::empty({GU}, f32) : torch::Tensor();
  if (Tn == 0) {
    dh0 = dhT_f32.defined() ? dhT_f32 : torch::zeros({B, U}, f32);
    dc0 = dcT_f32.defined() ? dcT_f32 : torch::zeros({B, U}, f32);
    if (db.defined()) db.zero_();
  } else {
    const Weights weights{{}, {}, {}, RT_rounded, {}, {}, {}, {}, {}, {}, mask};
    auto params = params_of<float>(weights, n, GU, false, kNoZoneout);
    params.RT_low = bits_of(RT_low);
    params.dXW_low = bits_of(dZ_low);
    const lstm::Saved<float> saved{G.data_ptr<float>(), nullptr, Cp.data_ptr<float>()};
    const lstm::Gradients<float> grads{nullptr, nullptr, nullptr, dh0.data_ptr<float>(), dc0.data_ptr<float>(),
                                       nullptr, nullptr, nullptr, nullptr, ptr_or_null<float>(db)};
    lstm::BackwardPass<float>(params, flags)
        .run(ptr_or_null<float>(dY_f32), ptr_or_null<float>(dhT_f32), ptr_or_null<float>(dcT_f32), saved, grads);
  }
  // the products over all steps on MKL's low-precision GEMM, float32 out (oneDNN's bf16 matmul
  // costs ~20 us a call at small sizes, and rounds its output)
  const Operand operand = operand_of(x);
  const int64_t BT = XB * XT, D = x.size(2);
  auto x_low = x.contiguous(), kernel_low = kernel.to(low).contiguous();
  torch::Tensor dX, dK, dR;
  if (needs[0]) {  // dx = dZ kernel^T
    dX = torch::empty({XB, XT, D}, f32);
    operand_gemm(operand, BT, D, GU, bits_of(dZ_low), GU, bits_of(kernel_low), GU, 0.0f, dX.data_ptr<float>(), D,
                 false, true);
  }
  if (needs[1]) {  // dkernel = x^T dZ
    dK = torch::empty({D, GU}, f32);
    operand_gemm(operand, D, GU, BT, bits_of(x_low), D, bits_of(dZ_low), GU, 0.0f, dK.data_ptr<float>(), GU, true);
  }
  if (needs[2]) {  // dR = Hp^T dZ
    dR = torch::empty({U, GU}, f32);
    operand_gemm(operand, U, GU, BT, bits_of(Hp), U, bits_of(dZ_low), GU, 0.0f, dR.data_ptr<float>(), GU, true);
  }
  return {dX, dK, dR, db, dh0, dc0};
}

}  // namespace

// ----- the plain cell ---------------------------------------------------------------------------------

std::vector<torch::Tensor> lstm_forward(torch::Tensor x, torch::Tensor kernel, torch::Tensor R,
                                        c10::optional<torch::Tensor> bias_o, torch::Tensor h0, torch::Tensor c0,
                                        c10::optional<torch::Tensor> in_drop_o,
                                        c10::optional<torch::Tensor> rec_drop_o,
                                        c10::optional<torch::Tensor> mask_o,
                                        c10::optional<torch::Tensor> batch_sizes_o, bool backwards, bool zero_out,
                                        bool seq, int64_t act, int64_t ract, bool save) {
  at::NoGradGuard no_grad;  // autograd is the caller's (a hand-derived backward)
  x = x.contiguous();
  kernel = kernel.contiguous();
  R = R.contiguous();
  h0 = h0.contiguous();
  c0 = c0.contiguous();
  auto bias = opt(bias_o), in_drop = opt(in_drop_o), rec_drop = opt(rec_drop_o), mask = opt(mask_o);
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();  // (every route reads it as dense [B, T])
  const Layout n = layout_of(x, opt(batch_sizes_o));
  if (is_low_precision(x)) {
    TORCH_CHECK(!in_drop.defined() && !rec_drop.defined(), "lstm_forward: no dropout in bfloat16/float16");
    return forward_low_precision(x, kernel, R, bias, h0, c0, mask, n,
                                 plain_flags(backwards, zero_out, seq, act, ract, save, operand_of(x)));
  }
  if (!save && !n.batch_sizes && x.size(1) == 1 && x.size(0) <= kSmallBatch && !in_drop.defined() &&
      !rec_drop.defined() && (!bias.defined() || bias.is_contiguous()))
    return single_step(x, kernel, R, bias, h0, c0, mask, seq, zero_out, act, ract);
  if (rec_drop.defined()) rec_drop = rec_drop.contiguous();
  if (bias.defined()) bias = bias.contiguous();
  const int64_t B = n.B, Tn = n.Tn, D = x.size(2), U = R.size(0), GU = 4 * U, XB = n.rows, XT = n.columns;
  const lstm::Flags fl = plain_flags(backwards, zero_out, seq, act, ract, save);
  const Weights weights{torch::Tensor(), bias, R, torch::Tensor(), rec_drop, {}, {}, {}, {}, {}, mask};
  auto opts = x.options();
  auto Y = seq ? buffer_pool::empty({XB, XT, U}, opts) : torch::empty({B, U}, opts);
  auto hT = torch::empty({B, U}, opts), cT = torch::empty({B, U}, opts);
  if (!save && !n.batch_sizes && !in_drop.defined() && !rec_drop.defined() && Tn > 0 && B > kSmallBatch &&
      D <= U) {
    // (measured, 2 cores: with D > U the one big projection GEMM wins, e.g. 32,80,100,64
    // 1.44 ms vs 1.66 ms; with D <= U the per-step [x_t, h] GEMM, e.g. 256,50,64,512 136 vs 177 ms)
    auto W = at::cat({kernel, R}, 0).contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward_xh", [&] {
      using T = scalar_t;
      lstm::ForwardPass<T>(params_of<T>(weights, n, GU, false, kNoZoneout), fl)
          .run_fused_input(D, x.data_ptr<T>(), W.data_ptr<T>(), h0.data_ptr<T>(), c0.data_ptr<T>(), Y.data_ptr<T>(),
                           hT.data_ptr<T>(), cT.data_ptr<T>());
    });
    return {Y, hT, cT};
  }
  // (the bias is the recurrence's to add, row by row: addmm first writes it over the whole
  // [B*T, 4U] output, measured +100 to +160 us at (32,80,100,64), 2 threads, against 0.5 ms for the mm)
  auto xw = project_inputs(x, kernel, in_drop);  // the activated gates G after the run
  torch::Tensor Hp, Cp;
  if (save) {
    Hp = buffer_pool::empty({XB, XT, U}, opts);
    Cp = buffer_pool::empty({XB, XT, U}, opts);
  }
  if (Tn == 0) {
    hT.copy_(h0);
    cT.copy_(c0);
    Y.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward", [&] {
      using T = scalar_t;
      const lstm::Saved<T> saved{save ? xw.data_ptr<T>() : nullptr, ptr_or_null<T>(Hp), ptr_or_null<T>(Cp)};
      lstm::ForwardPass<T>(params_of<T>(weights, n, GU, false, kNoZoneout), fl)
          .run(xw.data_ptr<T>(), h0.data_ptr<T>(), c0.data_ptr<T>(), Y.data_ptr<T>(), hT.data_ptr<T>(),
               cT.data_ptr<T>(), saved, nullptr, nullptr);
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
                                         c10::optional<torch::Tensor> mask_o,
                                         c10::optional<torch::Tensor> batch_sizes_o, bool backwards, bool zero_out,
                                         bool seq, int64_t act, int64_t ract, std::vector<bool> needs) {
  const FlushDenormalsOnPool flush;  // (the products over all steps read small gradients too)
  // needs: x, kernel, R, bias, h0, c0
  at::NoGradGuard no_grad;
  auto dY = opt(dY_o), in_drop = opt(in_drop_o), rec_drop = opt(rec_drop_o), mask = opt(mask_o);
  if (mask.defined()) mask = mask.to(torch::kBool).contiguous();
  const Layout n = layout_of(x, opt(batch_sizes_o));
  if (is_low_precision(x))
    return backward_low_precision(dY, opt(dhT_o), opt(dcT_o), x, kernel, R, G, Hp, Cp, mask, n,
                                  plain_flags(backwards, zero_out, seq, act, ract, true, operand_of(x)), needs);
  x = x.contiguous();
  kernel = kernel.contiguous();
  R = R.contiguous();
  const int64_t B = n.B, Tn = n.Tn, U = R.size(0), GU = 4 * U, XB = n.rows, XT = n.columns;
  const lstm::Flags fl = plain_flags(backwards, zero_out, seq, act, ract, true);
  auto opts = x.options();
  auto as_input = [&](const c10::optional<torch::Tensor>& t) {
    return t.has_value() ? t->to(x.scalar_type()).contiguous() : torch::Tensor();
  };
  auto dhT = as_input(dhT_o), dcT = as_input(dcT_o);
  if (dY.defined()) dY = buffer_pool::contiguous(dY.to(x.scalar_type()));
  if (rec_drop.defined()) rec_drop = rec_drop.contiguous();
  const Weights weights{torch::Tensor(), torch::Tensor(), R, R.t().contiguous(), rec_drop, {}, {}, {}, {}, {}, mask};
  auto dZ = buffer_pool::empty({XB, XT, GU}, opts);
  auto dh0 = torch::empty({B, U}, opts), dc0 = torch::empty({B, U}, opts);
  auto db = needs[3] ? torch::empty({GU}, opts) : torch::Tensor();
  if (Tn == 0) {
    dh0 = dhT.defined() ? dhT.clone() : torch::zeros({B, U}, opts);
    dc0 = dcT.defined() ? dcT.clone() : torch::zeros({B, U}, opts);
    if (db.defined()) db.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_backward", [&] {
      using T = scalar_t;
      const lstm::Saved<T> saved{G.data_ptr<T>(), Hp.data_ptr<T>(), Cp.data_ptr<T>()};
      const lstm::Gradients<T> grads{dZ.data_ptr<T>(), nullptr, nullptr, dh0.data_ptr<T>(), dc0.data_ptr<T>(),
                                     nullptr, nullptr, nullptr, nullptr, ptr_or_null<T>(db)};
      lstm::BackwardPass<T>(params_of<T>(weights, n, GU, false, kNoZoneout), fl)
          .run(ptr_or_null<T>(dY), ptr_or_null<T>(dhT), ptr_or_null<T>(dcT), saved, grads);
    });
  }
  auto dZ2 = dZ.view({XB * XT, GU});
  torch::Tensor dX, dK, dR;
  input_gradients(dZ2, x, kernel, in_drop, needs[0], needs[1], dX, dK);
  if (needs[2]) {
    if (!rec_drop.defined()) {
      dR = recurrent_gate_gradient(Hp, torch::Tensor(), dZ2);
    } else {
      const auto rows_rec_drop = per_buffer_row(rec_drop, n);
      std::vector<torch::Tensor> parts;
      for (int64_t g = 0; g < 4; ++g)
        parts.push_back(recurrent_gate_gradient(Hp, rows_rec_drop[g], dZ2.narrow(1, g * U, U)));
      dR = at::cat(parts, 1);
    }
  }
  return {dX, dK, dR, db, dh0, dc0};
}

// ----- the variants -------------------------------------------------------------------------------------

std::vector<torch::Tensor> variant_forward(torch::Tensor xk, c10::optional<torch::Tensor> gate_gain_o,
                                           c10::optional<torch::Tensor> bias_o, torch::Tensor R,
                                           c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
                                           c10::optional<torch::Tensor> gain_c_o,
                                           c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
                                           int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h,
                                           int64_t keep_c, c10::optional<torch::Tensor> mask_o,
                                           c10::optional<torch::Tensor> batch_sizes_o,
                                           torch::Tensor h0, torch::Tensor c0, bool backwards, bool zero_out, bool seq,
                                           bool coupled, int64_t act, int64_t ract, double clip, bool save,
                                           bool trace, int64_t operand) {
  at::NoGradGuard no_grad;
  save = save || trace;
  TORCH_CHECK(operand == 0 || xk.scalar_type() == torch::kFloat, "variant_forward: low-precision operands need float32");
  TORCH_CHECK(xk.is_contiguous(), "variant_forward: xk must be contiguous");
  R = R.contiguous();
  h0 = h0.contiguous();
  c0 = c0.contiguous();
  const Weights weights{contiguous_or_none(gate_gain_o), contiguous_or_none(bias_o), R, torch::Tensor(),
                        contiguous_or_none(rd_o), contiguous_or_none(peep_o), contiguous_or_none(gain_c_o),
                        contiguous_or_none(shift_c_o), contiguous_or_none(P_o), torch::Tensor(), bool_or_none(mask_o)};
  lstm::Flags fl{backwards, zero_out, seq, coupled, weights.peep.defined(), weights.gate_gain.defined(),
                 weights.P.defined(), save, static_cast<int>(act), static_cast<int>(ract), clip,
                 static_cast<int>(operand)};
  const Layout n = layout_of(xk, opt(batch_sizes_o));
  TORCH_CHECK(!n.batch_sizes || !trace, "variant_forward: no trace of a packed call");
  const int64_t B = n.B, XB = n.rows, XT = n.columns, GU = xk.size(2), Ps = R.size(0), U = GU / (coupled ? 3 : 4);
  auto opts = xk.options();
  auto Y = seq ? buffer_pool::empty({XB, XT, Ps}, opts) : torch::empty({B, Ps}, opts);  // (every row is written)
  auto hT = torch::empty({B, Ps}, opts), cT = torch::empty({B, U}, opts);
  torch::Tensor G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x, Htr, Ctr;
  if (trace) {
    Htr = buffer_pool::empty({XB, XT, Ps}, opts);
    Ctr = buffer_pool::empty({XB, XT, U}, opts);
  }
  if (save) {
    Hp = buffer_pool::empty({XB, XT, Ps}, opts);
    Cp = buffer_pool::empty({XB, XT, U}, opts);
    if (fl.ln) {
      G = buffer_pool::empty({XB, XT, GU}, opts);
      Ahat = buffer_pool::empty({XB, XT, GU}, opts);
      rstd_h = torch::empty({XB, XT}, opts);
      mean_c = torch::empty({XB, XT}, opts);
      rstd_c = torch::empty({XB, XT}, opts);
      Xk = xk;
      rstd_x = torch::empty({XB, XT}, opts);
      mean_x = torch::empty({XB, XT}, opts);
    } else {
      G = xk;  // (the gates are written over it)
    }
    if (fl.proj) Hu = buffer_pool::empty({XB, XT, U}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(xk.scalar_type(), "lstm_variant_forward", [&] {
    using T = scalar_t;
    auto p = [](torch::Tensor& t) -> T* { return ptr_or_null<T>(t); };
    const lstm::Saved<T> saved{p(G),      p(Hp), p(Cp), p(Ahat),   p(rstd_h), p(mean_c),
                               p(rstd_c), p(Hu), p(Xk), p(rstd_x), p(mean_x)};
    lstm::ForwardPass<T>(params_of<T>(weights, n, GU, coupled,
                                      Zoneout{zoneout_seed, zoneout_offset, keep_h, keep_c}),
                         fl)
        .run(xk.data_ptr<T>(), h0.data_ptr<T>(), c0.data_ptr<T>(), p(Y), p(hT), p(cT), saved, p(Htr), p(Ctr));
  });
  if (!save) return {Y, hT, cT};
  if (!trace) return {Y, hT, cT, G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x};
  return {Y, hT, cT, G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x, Htr, Ctr};
}

std::vector<torch::Tensor> variant_backward(
    c10::optional<torch::Tensor> dY_o, c10::optional<torch::Tensor> dhT_o, c10::optional<torch::Tensor> dcT_o,
    std::vector<torch::Tensor> saved, c10::optional<torch::Tensor> gate_gain_o, c10::optional<torch::Tensor> bias_o,
    torch::Tensor R, c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
    c10::optional<torch::Tensor> gain_c_o, c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
    int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h, int64_t keep_c,
    c10::optional<torch::Tensor> mask_o, c10::optional<torch::Tensor> batch_sizes_o, bool backwards, bool zero_out,
    bool seq, bool coupled, int64_t act, int64_t ract, double clip, bool consume) {
  const FlushDenormalsOnPool flush;  // (the products over all steps read small gradients too)
  at::NoGradGuard no_grad;
  auto G = saved[0].contiguous(), Hp = saved[1].contiguous(), Cp = saved[2].contiguous();
  auto Ahat = saved[3], rstd_h = saved[4], mean_c = saved[5], rstd_c = saved[6], Xk = saved[8], rstd_x = saved[9],
       mean_x = saved[10];
  auto dY = dY_o.has_value() ? buffer_pool::contiguous(*dY_o) : torch::Tensor();
  auto dhT = contiguous_or_none(dhT_o), dcT = contiguous_or_none(dcT_o);
  R = R.contiguous();
  auto P = contiguous_or_none(P_o);
  const Weights weights{contiguous_or_none(gate_gain_o), contiguous_or_none(bias_o), R, R.t().contiguous(),
                        contiguous_or_none(rd_o), contiguous_or_none(peep_o), contiguous_or_none(gain_c_o),
                        contiguous_or_none(shift_c_o), P, P.defined() ? P.t().contiguous() : torch::Tensor(),
                        bool_or_none(mask_o)};
  lstm::Flags fl{backwards, zero_out, seq, coupled, weights.peep.defined(), weights.gate_gain.defined(),
                 P.defined(), true, static_cast<int>(act), static_cast<int>(ract), clip};
  const Layout n = layout_of(G, opt(batch_sizes_o));
  const int64_t B = n.B, XB = n.rows, XT = n.columns, GU = G.size(2), Ps = R.size(0), U = GU / (coupled ? 3 : 4);
  auto opts = G.options();
  const bool in_place = consume && (!fl.ln || (Xk.is_contiguous() && Ahat.is_contiguous()));
  auto dXW = in_place ? (fl.ln ? Xk : G) : buffer_pool::empty({XB, XT, GU}, opts);
  auto DA = fl.ln ? (in_place ? Ahat : buffer_pool::empty({XB, XT, GU}, opts)) : torch::Tensor();
  auto Dr = fl.proj ? buffer_pool::empty({XB, XT, Ps}, opts) : torch::Tensor();
  auto dh0 = torch::empty({B, Ps}, opts), dc0 = torch::empty({B, U}, opts);
  // the weight gradients, summed over the batch
  auto empty_if = [&](bool used, at::IntArrayRef shape) { return used ? torch::empty(shape, opts) : torch::Tensor(); };
  auto dpeep = empty_if(fl.peephole, {coupled ? 2 : 3, U}), dgain_c = empty_if(fl.ln, {U}),
       dshift_c = empty_if(fl.ln, {U}), dgate_gain = empty_if(fl.ln, {2, GU}),
       dbias = empty_if(weights.bias.defined(), {GU});
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_variant_backward", [&] {
    using T = scalar_t;
    auto p = [](torch::Tensor& t) -> T* { return ptr_or_null<T>(t); };
    const lstm::Saved<T> saved_buffers{p(G),      p(Hp),   p(Cp), p(Ahat),   p(rstd_h), p(mean_c),
                                       p(rstd_c), nullptr, p(Xk), p(rstd_x), p(mean_x)};
    const lstm::Gradients<T> grads{p(dXW),   p(DA),      p(Dr),       p(dh0),        p(dc0),
                                   p(dpeep), p(dgain_c), p(dshift_c), p(dgate_gain), p(dbias)};
    lstm::BackwardPass<T>(params_of<T>(weights, n, GU, coupled,
                                       Zoneout{zoneout_seed, zoneout_offset, keep_h, keep_c}),
                          fl)
        .run(p(dY), p(dhT), p(dcT), saved_buffers, grads);
  });
  return {dXW, DA, Dr, dh0, dc0, dpeep, dgain_c, dshift_c, dgate_gain, dbias};
}
