// The LSTM variants' torch bindings (bindings.h: variant_forward, variant_backward): checks and
// buffers for variants::ForwardPass and BackwardPass. The products over all steps are the
// caller's (fused_variants.py): xk = x @ kernel before, the weight gradients after.

#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/optional_tensor.h"
#include "buffer_pool.h"
#include "rnn.h"

using namespace lstm_core;
using lstm_bindings::bool_or_none;
using lstm_bindings::contiguous_or_none;

namespace {

struct Zoneout {  // the seed, the step offset and the two keep thresholds (0: off) of problem.Zoneout
  int64_t seed, offset, keep_h, keep_c;
};

// the raw view of one call's tensors (undefined: nullptr); sizes B, T, GU from xk (or G)
template <typename T>
variants::Params<T> variant_params(const torch::Tensor& xk, const torch::Tensor& gate_gain, const torch::Tensor& bias,
                                   const torch::Tensor& R, const torch::Tensor& RT, const torch::Tensor& rd,
                                   const torch::Tensor& peep, const torch::Tensor& gain_c,
                                   const torch::Tensor& shift_c, const torch::Tensor& P, const torch::Tensor& PT,
                                   const Zoneout& zoneout, const torch::Tensor& mask, bool coupled) {
  auto ptr = [](const torch::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
  variants::Params<T> v;
  v.gain_x = ptr(gate_gain);
  v.gain_h = v.gain_x ? v.gain_x + xk.size(2) : nullptr;
  v.bias = ptr(bias);
  v.R = ptr(R);
  v.RT = ptr(RT);
  v.rd = ptr(rd);
  v.peep = ptr(peep);
  v.gain_c = ptr(gain_c);
  v.shift_c = ptr(shift_c);
  v.P = ptr(P);
  v.PT = ptr(PT);
  v.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  v.zoneout_seed = uint64_t(zoneout.seed);
  v.zoneout_offset = zoneout.offset;
  v.keep_h = uint64_t(zoneout.keep_h);
  v.keep_c = uint64_t(zoneout.keep_c);
  v.B = xk.size(0);
  v.Tn = xk.size(1);
  v.GU = xk.size(2);
  v.G = coupled ? 3 : 4;
  v.U = v.GU / v.G;
  v.Ps = R.size(0);
  return v;
}

}  // namespace

std::vector<torch::Tensor> variant_forward(torch::Tensor xk, c10::optional<torch::Tensor> gate_gain_o,
                                           c10::optional<torch::Tensor> bias_o, torch::Tensor R,
                                           c10::optional<torch::Tensor> rd_o, c10::optional<torch::Tensor> peep_o,
                                           c10::optional<torch::Tensor> gain_c_o,
                                           c10::optional<torch::Tensor> shift_c_o, c10::optional<torch::Tensor> P_o,
                                           int64_t zoneout_seed, int64_t zoneout_offset, int64_t keep_h,
                                           int64_t keep_c,
                                           c10::optional<torch::Tensor> mask_o,
                                           torch::Tensor h0, torch::Tensor c0, bool backwards, bool zero_out, bool seq,
                                           bool coupled, int64_t act, int64_t ract, double clip, bool save,
                                           bool trace) {
  at::NoGradGuard no_grad;
  save = save || trace;
  TORCH_CHECK(xk.is_contiguous(), "variant_forward: xk must be contiguous");
  R = R.contiguous();
  h0 = h0.contiguous();
  c0 = c0.contiguous();
  auto rd = contiguous_or_none(rd_o), peep = contiguous_or_none(peep_o), gain_c = contiguous_or_none(gain_c_o),
       shift_c = contiguous_or_none(shift_c_o), P = contiguous_or_none(P_o),
       gate_gain = contiguous_or_none(gate_gain_o), bias = contiguous_or_none(bias_o), mask = bool_or_none(mask_o);
  variants::Flags fl{backwards, zero_out, seq, coupled, peep.defined(), gate_gain.defined(), P.defined(), save,
                     static_cast<int>(act), static_cast<int>(ract), clip};
  const int64_t B = xk.size(0), Tn = xk.size(1), GU = xk.size(2), Ps = R.size(0), U = GU / (coupled ? 3 : 4);
  auto opts = xk.options();
  auto Y = seq ? buffer_pool::empty({B, Tn, Ps}, opts) : torch::empty({B, Ps}, opts);  // (every row is written)
  auto hT = torch::empty({B, Ps}, opts), cT = torch::empty({B, U}, opts);
  torch::Tensor G, Hp, Cp, Ahat, rstd_h, mean_c, rstd_c, Hu, Xk, rstd_x, mean_x, Htr, Ctr;
  if (trace) {
    Htr = buffer_pool::empty({B, Tn, Ps}, opts);
    Ctr = buffer_pool::empty({B, Tn, U}, opts);
  }
  if (save) {
    G = buffer_pool::empty({B, Tn, GU}, opts);
    Hp = buffer_pool::empty({B, Tn, Ps}, opts);
    Cp = buffer_pool::empty({B, Tn, U}, opts);
    if (fl.ln) {
      Ahat = buffer_pool::empty({B, Tn, GU}, opts);
      rstd_h = torch::empty({B, Tn}, opts);
      mean_c = torch::empty({B, Tn}, opts);
      rstd_c = torch::empty({B, Tn}, opts);
      Xk = xk;
      rstd_x = torch::empty({B, Tn}, opts);
      mean_x = torch::empty({B, Tn}, opts);
    }
    if (fl.proj) Hu = buffer_pool::empty({B, Tn, U}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(xk.scalar_type(), "lstm_variant_forward", [&] {
    using T = scalar_t;
    auto v = variant_params<T>(xk, gate_gain, bias, R, torch::Tensor(), rd, peep, gain_c, shift_c, P,
                               torch::Tensor(), Zoneout{zoneout_seed, zoneout_offset, keep_h, keep_c}, mask, coupled);
    auto p = [](torch::Tensor& t) -> T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const variants::Saved<T> saved{p(G),      p(Hp), p(Cp), p(Ahat),   p(rstd_h), p(mean_c),
                                   p(rstd_c), p(Hu), p(Xk), p(rstd_x), p(mean_x)};
    variants::ForwardPass<T>(v, fl).run(xk.data_ptr<T>(), h0.data_ptr<T>(), c0.data_ptr<T>(), p(Y), p(hT), p(cT),
                                        saved, p(Htr), p(Ctr));
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
    c10::optional<torch::Tensor> mask_o, bool backwards, bool zero_out, bool seq, bool coupled, int64_t act,
    int64_t ract, double clip, bool consume) {
  at::NoGradGuard no_grad;
  auto G = saved[0].contiguous(), Hp = saved[1].contiguous(), Cp = saved[2].contiguous();
  auto Ahat = saved[3], rstd_h = saved[4], mean_c = saved[5], rstd_c = saved[6], Xk = saved[8], rstd_x = saved[9],
       mean_x = saved[10];
  auto dY = dY_o.has_value() ? buffer_pool::contiguous(*dY_o) : torch::Tensor();
  auto dhT = contiguous_or_none(dhT_o), dcT = contiguous_or_none(dcT_o);
  auto rd = contiguous_or_none(rd_o), peep = contiguous_or_none(peep_o), gain_c = contiguous_or_none(gain_c_o),
       shift_c = contiguous_or_none(shift_c_o), P = contiguous_or_none(P_o),
       gate_gain = contiguous_or_none(gate_gain_o), bias = contiguous_or_none(bias_o), mask = bool_or_none(mask_o);
  R = R.contiguous();
  auto RT = R.t().contiguous();
  auto PT = P.defined() ? P.t().contiguous() : torch::Tensor();
  variants::Flags fl{backwards, zero_out, seq, coupled, peep.defined(), gate_gain.defined(), P.defined(), true,
                     static_cast<int>(act), static_cast<int>(ract), clip};
  const int64_t B = G.size(0), Tn = G.size(1), GU = G.size(2), Ps = R.size(0), U = GU / (coupled ? 3 : 4);
  auto opts = G.options();
  const bool in_place = consume && (!fl.ln || (Xk.is_contiguous() && Ahat.is_contiguous()));
  auto dXW = in_place ? (fl.ln ? Xk : G) : buffer_pool::empty({B, Tn, GU}, opts);
  auto DA = fl.ln ? (in_place ? Ahat : buffer_pool::empty({B, Tn, GU}, opts)) : torch::Tensor();
  auto Dr = fl.proj ? buffer_pool::empty({B, Tn, Ps}, opts) : torch::Tensor();
  auto dh0 = torch::empty({B, Ps}, opts), dc0 = torch::empty({B, U}, opts);
  // the weight gradients, summed over the batch
  auto empty_if = [&](bool used, at::IntArrayRef shape) { return used ? torch::empty(shape, opts) : torch::Tensor(); };
  auto dpeep = empty_if(fl.peephole, {coupled ? 2 : 3, U}), dgain_c = empty_if(fl.ln, {U}),
       dshift_c = empty_if(fl.ln, {U}), dgate_gain = empty_if(fl.ln, {2, GU}), dbias = empty_if(bias.defined(), {GU});
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_variant_backward", [&] {
    using T = scalar_t;
    auto v = variant_params<T>(G, gate_gain, bias, R, RT, rd, peep, gain_c, shift_c, P, PT,
                               Zoneout{zoneout_seed, zoneout_offset, keep_h, keep_c}, mask, coupled);
    auto p = [](torch::Tensor& t) -> T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const variants::Saved<T> saved_buffers{p(G),      p(Hp),   p(Cp), p(Ahat),   p(rstd_h), p(mean_c),
                                           p(rstd_c), nullptr, p(Xk), p(rstd_x), p(mean_x)};
    const variants::Gradients<T> grads{p(dXW),   p(DA),      p(Dr),       p(dh0),        p(dc0),
                                       p(dpeep), p(dgain_c), p(dshift_c), p(dgate_gain), p(dbias)};
    auto cp = [](const torch::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
    variants::BackwardPass<T>(v, fl).run(cp(dY), cp(dhT), cp(dcT), saved_buffers, grads);
  });
  return {dXW, DA, Dr, dh0, dc0, dpeep, dgain_c, dshift_c, dgate_gain, dbias};
}
