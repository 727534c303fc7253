// The fused LSTM kernel core on CPU (float32 / float64): one input-projection GEMM for all
// steps, then per step one recurrent GEMM (MKL sgemm_/dgemm_ as ATen calls them, or a register loop for
// tiny batches) and the gate math fused in one vectorised pass; the backward is BPTT derived by
// hand over the saved gates, with the weight gradients as one GEMM each after the loop.
//
// Layout: batch-major, exactly the caller's x [B, T, D]. xw = x @ kernel + b is [B, T, 4U] and
// becomes the activated gates in place (saved for the backward). Step s processes time index
// t = s (or T-1-s with go_backwards); its rows are strided by T*4U, which BLAS takes as ldc,
// so no transposes or flips of x, dx or the gates are ever materialised.
//
// Saved for the backward (training only): gates G [B,T,4U], Hp [B,T,U] and Cp [B,T,U], the
// states *before* the step that processes time index t. tanh(c_t) is recomputed in the
// backward. That is 6*B*T*U values, plus the caller's output.
//
// Masking follows Keras: a masked step keeps (h, c); its output repeats the previous output
// (zeros before the first step) or is zero with zero_output_for_mask.
//
// Activation codes: tanh 0, sigmoid 1, relu 2, linear 3, hard_sigmoid 4 (x/6+1/2 clipped),
// hard_sigmoid_tf_keras 5 (0.2x+1/2 clipped); derivatives are taken from the outputs.

#include <torch/extension.h>
#include <type_traits>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "buffer_pool.h"
#include "gemm.h"
#include "simd.h"
#include "threads.h"

namespace {

using namespace lstm_core;

// multiply-adds of a streaming step from which it uses the threads (measured on 2 cores: from
// about D=128, H=128; set_stream_parallel_work)
int64_t kStreamParallelWork = int64_t(1) << 17;

// One row of gate math: z [4U] pre-activations in, activated in place; writes c_new and h.
template <typename T>
inline void gate_row(T* __restrict__ z, const T* __restrict__ cp, T* __restrict__ c_new, T* __restrict__ h,
                     int64_t U, int act, int ract) {
  if (act == ract) {
    act_inplace(act, z, 4 * U);
  } else {
    act_inplace(ract, z, 2 * U);
    act_inplace(act, z + 2 * U, U);
    act_inplace(ract, z + 3 * U, U);
  }
  const T* i = z;
  const T* f = z + U;
  const T* g = z + 2 * U;
  const T* o = z + 3 * U;
  for (int64_t j = 0; j < U; ++j) {
    T c = f[j] * cp[j] + i[j] * g[j];
    c_new[j] = c;
    h[j] = c;
  }
  act_inplace(act, h, U);
  for (int64_t j = 0; j < U; ++j) h[j] *= o[j];
}


struct Flags {
  bool backwards, zero_out, seq;
  int act, ract;
};

inline torch::Tensor opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

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

template <typename T>
void forward_loop(int64_t B, int64_t Tn, int64_t U, T* xw, const T* bias, const T* R, const T* rd, int64_t rdG,
                  const bool* keep, const Flags& fl, const T* h0, const T* c0, T* Y, T* hT, T* cT, T* Hp, T* Cp) {
  const int64_t GU = 4 * U;
  const int64_t ldz = Tn * GU;
  const bool save = Hp != nullptr;
  std::vector<T> hbuf(save ? 0 : 2 * B * U), cbuf(save ? 0 : 2 * B * U), ylast(fl.seq ? 0 : B * U, T(0));
  std::vector<T> hm(rd ? 4 * B * U : 0);
  const StepOperand<T> rec(B, GU, U, R, GU, rd ? 0 : Tn);  // (recurrent dropout: four products per step)
  // state before step s: pointer and leading dimension
  auto hprev_of = [&](int64_t s, int64_t t, int64_t& ld) -> T* {
    if (save) { ld = Tn * U; return Hp + t * U; }
    ld = U;
    return hbuf.data() + (s % 2) * B * U;
  };
  auto cprev_of = [&](int64_t s, int64_t t) -> T* { return save ? Cp + t * U : cbuf.data() + (s % 2) * B * U; };
  {  // initial state
    int64_t ld;
    int64_t t0 = fl.backwards ? Tn - 1 : 0;
    T* hp = hprev_of(0, t0, ld);
    T* cp = cprev_of(0, t0);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(hp + b * ld, h0 + b * U, U * sizeof(T));
      std::memcpy(cp + b * ld, c0 + b * U, U * sizeof(T));
    }
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    const bool last = s == Tn - 1;
    const int64_t tn = fl.backwards ? t - 1 : t + 1;
    int64_t ldh, ldn = U;
    T* hp = hprev_of(s, t, ldh);
    T* cp = cprev_of(s, t);
    T* hn;
    T* cn;
    if (last) {
      hn = hT; cn = cT; ldn = U;
    } else {
      hn = hprev_of(s + 1, tn, ldn);
      cn = cprev_of(s + 1, tn);
    }
    T* z = xw + t * GU;
    if (rd == nullptr) {
      rec.acc(hp, ldh, z, ldz);
    } else {
      for (int64_t g = 0; g < 4; ++g) {
        T* dst = hm.data() + g * B * U;
        const T* m = rd + g * rdG;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < U; ++j) dst[b * U + j] = hp[b * ldh + j] * m[b * U + j];
        mm_acc<T>(B, U, U, dst, U, R + g * U, GU, z + g * U, ldz);
      }
    }
    over_rows(B, 5 * U, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (!last) {  // this row's buffers at the next step
          prefetch_write(xw + b * ldz + tn * GU, GU);
          if (save && s + 2 < Tn) {
            const int64_t tnn = fl.backwards ? tn - 1 : tn + 1;
            prefetch_write(Hp + (b * Tn + tnn) * U, U);
            prefetch_write(Cp + (b * Tn + tnn) * U, U);
          }
          if (fl.seq) prefetch_write(Y + (b * Tn + s + 1) * U, U);
        }
        T* zr = z + b * ldz;
        const T* cpr = cp + b * ldh;  // Cp shares Hp's layout
        const T* hpr = hp + b * ldh;
        T* cnr = cn + b * ldn;
        T* hnr = hn + b * ldn;
        const bool kept = keep == nullptr || keep[b * Tn + t];
        T* yrow = fl.seq ? Y + (b * Tn + s) * U : ylast.data() + b * U;
        if (bias)
          for (int64_t j = 0; j < GU; ++j) zr[j] += bias[j];
        if (kept) {
          gate_row(zr, cpr, cnr, hnr, U, fl.act, fl.ract);
          std::memcpy(yrow, hnr, U * sizeof(T));
        } else {
          // activated gates are still saved (the backward ignores masked steps)
          if (fl.act == fl.ract) {
            act_inplace(fl.act, zr, 4 * U);
          } else {
            act_inplace(fl.ract, zr, 2 * U);
            act_inplace(fl.act, zr + 2 * U, U);
            act_inplace(fl.ract, zr + 3 * U, U);
          }
          if (cnr != cpr) std::memcpy(cnr, cpr, U * sizeof(T));
          if (hnr != hpr) std::memcpy(hnr, hpr, U * sizeof(T));
          if (fl.seq) {
            if (fl.zero_out || s == 0) std::memset(yrow, 0, U * sizeof(T));
            else std::memcpy(yrow, Y + (b * Tn + s - 1) * U, U * sizeof(T));
          } else if (fl.zero_out) {
            std::memset(yrow, 0, U * sizeof(T));
          }
        }
      }
    });
  }
  if (!fl.seq && Tn > 0) std::memcpy(Y, ylast.data(), B * U * sizeof(T));
}

// Inference over a large batch: no [B,T,4U] projection buffer at all (for big shapes it costs
// page faults and memory bandwidth, not FLOPs). Each step is one GEMM [x_t, h] @ [kernel; R]
// on a [B, D+U] buffer that holds x_t next to h; c and z are small per-call buffers.
template <typename T>
void forward_loop_xh(int64_t B, int64_t Tn, int64_t D, int64_t U, const T* x, const T* W, const T* bias,
                     const bool* keep, const Flags& fl, const T* h0, const T* c0, T* Y, T* hT, T* cT) {
  const int64_t GU = 4 * U, DU = D + U;
  std::vector<T> xh(B * DU), z(B * GU), c(B * U), ylast(fl.seq ? 0 : B * U, T(0));
  const StepOperand<T> w(B, GU, DU, W, GU, Tn);
  auto time_of = [&](int64_t s) { return fl.backwards ? Tn - 1 - s : s; };
  auto load_row = [&](int64_t b, int64_t t) {  // x_t next to h, the bias into z
    std::memcpy(xh.data() + b * DU, x + (b * Tn + t) * D, D * sizeof(T));
    if (bias) std::memcpy(z.data() + b * GU, bias, GU * sizeof(T));
    else std::fill(z.data() + b * GU, z.data() + (b + 1) * GU, T(0));
  };
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(xh.data() + b * DU + D, h0 + b * U, U * sizeof(T));
    std::memcpy(c.data() + b * U, c0 + b * U, U * sizeof(T));
    if (Tn > 0) load_row(b, time_of(0));
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_of(s);
    w.acc(xh.data(), DU, z.data(), GU);
    // the rows' gate math, then their next step's inputs: one pass over the threads per step
    // (the rows of a call that runs on MKL's threads would otherwise wait on one thread)
    over_rows(B, 5 * U + DU, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const bool kept = keep == nullptr || keep[b * Tn + t];
        T* yrow = fl.seq ? Y + (b * Tn + s) * U : ylast.data() + b * U;
        T* hrow = xh.data() + b * DU + D;
        if (kept) {
          gate_row(z.data() + b * GU, c.data() + b * U, c.data() + b * U, hrow, U, fl.act, fl.ract);
          std::memcpy(yrow, hrow, U * sizeof(T));
        } else if (fl.seq) {
          if (fl.zero_out || s == 0) std::memset(yrow, 0, U * sizeof(T));
          else std::memcpy(yrow, Y + (b * Tn + s - 1) * U, U * sizeof(T));
        } else if (fl.zero_out) {
          std::memset(yrow, 0, U * sizeof(T));
        }
        if (s + 1 < Tn) load_row(b, time_of(s + 1));
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(hT + b * U, xh.data() + b * DU + D, U * sizeof(T));
    std::memcpy(cT + b * U, c.data() + b * U, U * sizeof(T));
  }
  if (!fl.seq && Tn > 0) std::memcpy(Y, ylast.data(), B * U * sizeof(T));
}

}  // namespace

// One step for a tiny batch without saving (the Keras cell call `cell(x_t, state)`): no input
// projection GEMM, no scratch tensors; z = b + x @ kernel + h @ R in registers-friendly loops.
std::vector<torch::Tensor> single_step(const torch::Tensor& x, const torch::Tensor& kernel, const torch::Tensor& R,
                                       const torch::Tensor& bias, const torch::Tensor& h0, const torch::Tensor& c0,
                                       const torch::Tensor& mask, bool seq, bool zero_out, int64_t act,
                                       int64_t ract) {
  const int64_t B = x.size(0), D = kernel.size(0), U = R.size(0), GU = 4 * U;  // x [B, 1, D] or [B, D]
  auto st = x.scalar_type();
  at::Tensor Y = seq ? at::Tensor(at::detail::empty_cpu({B, 1, U}, st, false))
                     : at::Tensor(at::detail::empty_cpu({B, U}, st, false));
  at::Tensor hT = at::detail::empty_cpu({B, U}, st, false), cT = at::detail::empty_cpu({B, U}, st, false);
  AT_DISPATCH_FLOATING_TYPES(st, "lstm_single_step", [&] {
    using T = scalar_t;
    T z[4 * 1024];
    std::vector<T> zv;
    T* zp = z;
    if (B * GU > 4 * 1024) { zv.resize(B * GU); zp = zv.data(); }
    const T* xp = x.data_ptr<T>();
    const T* hp = h0.data_ptr<T>();
    const T* cp = c0.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      if (bias.defined()) std::memcpy(zp + b * GU, bias.data_ptr<T>(), GU * sizeof(T));
      else std::fill(zp + b * GU, zp + (b + 1) * GU, T(0));
    }
    small_gemm::small_gemm_acc<T>(B, GU, D, xp, D, kernel.data_ptr<T>(), GU, zp, GU);
    small_gemm::small_gemm_acc<T>(B, GU, U, hp, U, R.data_ptr<T>(), GU, zp, GU);
    T* Yp = Y.data_ptr<T>();
    T* hTp = hT.data_ptr<T>();
    T* cTp = cT.data_ptr<T>();
    const bool* kp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      if (kp == nullptr || kp[b]) {
        gate_row(zp + b * GU, cp + b * U, cTp + b * U, hTp + b * U, U, (int)act, (int)ract);
        std::memcpy(Yp + b * U, hTp + b * U, U * sizeof(T));
      } else {
        std::memcpy(hTp + b * U, hp + b * U, U * sizeof(T));
        std::memcpy(cTp + b * U, cp + b * U, U * sizeof(T));
        std::fill(Yp + b * U, Yp + (b + 1) * U, T(0));  // the first step: no previous output
      }
    }
  });
  return {Y, hT, cT};
}

// The Keras cell call's lean route (`out, [h, c] = cell(x_t, [h, c])`): the layer route's checks
// answered here, then single_step. Returns an empty list when the call is not this route's (a
// dtype, device, layout or shape the full route converts or reports, a batch over kSmallBatch):
// the caller then takes the full route, which gives the same numbers or the error; [None] when
// every check passes but a tensor needs grad (the caller runs the autograd Function). h and c
// absent: zeros.
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

// ----- forward ------------------------------------------------------------------------------------
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
  Flags fl{backwards, zero_out, seq, static_cast<int>(act), static_cast<int>(ract)};
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
      const T* xp = x.data_ptr<T>();
      const T* Wp = W.data_ptr<T>();
      const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
      const bool* kp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      const T* h0p = h0.data_ptr<T>();
      const T* c0p = c0.data_ptr<T>();
      T* Yp = Y.data_ptr<T>();
      T* hTp = hT.data_ptr<T>();
      T* cTp = cT.data_ptr<T>();
      over_chunks(B, (D + U) * 4 * U, [&](int64_t b0, int64_t b1) {
        forward_loop_xh<T>(b1 - b0, Tn, D, U, xp + b0 * Tn * D, Wp, bp, kp ? kp + b0 * Tn : nullptr, fl,
                           h0p + b0 * U, c0p + b0 * U, Yp + b0 * (seq ? Tn : 1) * U, hTp + b0 * U, cTp + b0 * U);
      });
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
      T* xwp = xw.data_ptr<T>();
      const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
      const T* Rp = R.data_ptr<T>();
      const T* rdp = rec_drop.defined() ? rec_drop.data_ptr<T>() : nullptr;
      const bool* kp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      const T* h0p = h0.data_ptr<T>();
      const T* c0p = c0.data_ptr<T>();
      T* Yp = Y.data_ptr<T>();
      T* hTp = hT.data_ptr<T>();
      T* cTp = cT.data_ptr<T>();
      T* Hpp = save ? Hp.data_ptr<T>() : nullptr;
      T* Cpp = save ? Cp.data_ptr<T>() : nullptr;
      over_chunks(B, U * 4 * U, [&](int64_t b0, int64_t b1) {
        forward_loop<T>(b1 - b0, Tn, U, xwp + b0 * Tn * 4 * U, bp, Rp, rdp ? rdp + b0 * U : nullptr, B * U,
                        kp ? kp + b0 * Tn : nullptr, fl, h0p + b0 * U, c0p + b0 * U,
                        Yp + b0 * (seq ? Tn : 1) * U, hTp + b0 * U, cTp + b0 * U, Hpp ? Hpp + b0 * Tn * U : nullptr,
                        Cpp ? Cpp + b0 * Tn * U : nullptr);
      });
    });
  }
  if (!save) return {Y, hT, cT};
  return {Y, hT, cT, xw, Hp, Cp};
}

// ----- backward -----------------------------------------------------------------------------------
namespace {
// dZ of one row for sigmoid gates and tanh (restrict: vectorised without alias checks)
template <typename T>
inline void bwd_row_sigmoid_tanh(const T* __restrict__ g, const T* __restrict__ cp, const T* __restrict__ dctv,
                                 const T* __restrict__ dhn, const T* __restrict__ tc, T* __restrict__ d,
                                 T* __restrict__ dcb, int64_t U) {
  const T* __restrict__ gi = g;
  const T* __restrict__ gf = g + U;
  const T* __restrict__ gg = g + 2 * U;
  const T* __restrict__ go = g + 3 * U;
  T* __restrict__ d0 = d;
  T* __restrict__ d1 = d + U;
  T* __restrict__ d2 = d + 2 * U;
  T* __restrict__ d3 = d + 3 * U;
  for (int64_t j = 0; j < U; ++j) {
    const T dct = dctv[j], i = gi[j], f = gf[j], gv = gg[j], o = go[j];
    d0[j] = dct * gv * (i * (T(1) - i));
    d1[j] = dct * cp[j] * (f * (T(1) - f));
    d2[j] = dct * i * (T(1) - gv * gv);
    d3[j] = dhn[j] * tc[j] * (o * (T(1) - o));
    dcb[j] = dct * f;
  }
}

template <typename T>
void backward_loop(int64_t B, int64_t Tn, int64_t U, const T* dY, const T* G, const T* Hp, const T* Cp,
                   const T* RT, const T* rd, int64_t rdG, const bool* keep, const Flags& fl, T* dh, T* dc, T* dZ,
                   T* db_rows) {
  const int64_t GU = 4 * U;
  const int64_t ldz = Tn * GU;
  const bool carry_on = keep != nullptr && !fl.zero_out;
  std::vector<T> carry(carry_on ? B * U : 0, T(0)), dhp(B * U), tmp(rd ? B * U : 0);
  const StepOperand<T> rec_t(B, U, GU, RT, U, rd ? 0 : Tn);  // (recurrent dropout: four products per step)
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    const T* dy = nullptr;
    int64_t ldy = 0;
    if (dY != nullptr) {
      if (fl.seq) { dy = dY + s * U; ldy = Tn * U; }
      else if (s == Tn - 1) { dy = dY; ldy = U; }
    }
    T* dz = dZ + t * GU;
    over_rows(B, 8 * U, [&](int64_t b0, int64_t b1) {
      std::vector<T> dhn(U), tc(U), d1(U), d2(U);
      for (int64_t b = b0; b < b1; ++b) {
        if (s > 0) {  // this row's buffers at the next step (the previous one in time)
          const int64_t next = b * Tn + (fl.backwards ? t + 1 : t - 1);
          prefetch_read(G + next * GU, GU);
          prefetch_read(Cp + next * U, U);
          prefetch_write(dZ + next * GU, GU);
          if (dy && fl.seq) prefetch_read(dy + b * ldy - U, U);
        }
        const bool kept = keep == nullptr || keep[b * Tn + t];
        T* d = dz + b * ldz;
        T* dhb = dh + b * U;
        T* dcb = dc + b * U;
        if (!kept) {
          std::memset(d, 0, GU * sizeof(T));
          if (carry_on && dy) {
            T* cr = carry.data() + b * U;
            const T* dyr = dy + b * ldy;
            for (int64_t j = 0; j < U; ++j) cr[j] += dyr[j];
          }
          continue;
        }
        const T* g = G + b * ldz + t * GU;
        const T* gi = g;
        const T* gf = g + U;
        const T* gg = g + 2 * U;
        const T* go = g + 3 * U;
        const T* cp = Cp + (b * Tn + t) * U;
        std::memcpy(dhn.data(), dhb, U * sizeof(T));
        if (dy) {
          const T* dyr = dy + b * ldy;
          for (int64_t j = 0; j < U; ++j) dhn[j] += dyr[j];
        }
        if (carry_on) {
          T* cr = carry.data() + b * U;
          for (int64_t j = 0; j < U; ++j) { dhn[j] += cr[j]; cr[j] = T(0); }
        }
        for (int64_t j = 0; j < U; ++j) tc[j] = gf[j] * cp[j] + gi[j] * gg[j];
        act_inplace(fl.act, tc.data(), U);
        dact_arr(fl.act, tc.data(), d1.data(), U);
        // dct = dc + dhn * o * act'(tanh c)
        for (int64_t j = 0; j < U; ++j) d1[j] = dcb[j] + dhn[j] * go[j] * d1[j];
        if (fl.ract == 1 && fl.act == 0) {
          bwd_row_sigmoid_tanh(g, cp, d1.data(), dhn.data(), tc.data(), d, dcb, U);
        } else {
          for (int64_t j = 0; j < U; ++j) {
            const T dct = d1[j], i = gi[j], f = gf[j], gv = gg[j], o = go[j];
            d[j] = dct * gv * dact(fl.ract, i);
            d[U + j] = dct * cp[j] * dact(fl.ract, f);
            d[2 * U + j] = dct * i * dact(fl.act, gv);
            d[3 * U + j] = dhn[j] * tc[j] * dact(fl.ract, o);
            dcb[j] = dct * f;
          }
        }
        if (db_rows) {  // this batch row's bias gradient, summed over its steps
          T* dbr = db_rows + b * GU;
          for (int64_t j = 0; j < GU; ++j) dbr[j] += d[j];
        }
      }
    });
    // dh_{t-1} = dZ_t @ R^T (per gate times the recurrent dropout masks); RT = R^T [4U, U]
    if (rd == nullptr) {
      rec_t.set(dz, ldz, dhp.data(), U);
    } else {
      std::fill(dhp.begin(), dhp.end(), T(0));
      for (int64_t g = 0; g < 4; ++g) {
        mm_set<T>(B, U, U, dz + g * U, ldz, RT + g * U * U, U, tmp.data(), U);
        const T* m = rd + g * rdG;
        for (int64_t k = 0; k < B * U; ++k) dhp[k] += tmp[k] * m[k];
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      if (keep == nullptr || keep[b * Tn + t]) std::memcpy(dh + b * U, dhp.data() + b * U, U * sizeof(T));
    }
  }
}
}  // namespace

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
  Flags fl{backwards, zero_out, seq, static_cast<int>(act), static_cast<int>(ract)};
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
      const T* dYp = dY.defined() ? dY.data_ptr<T>() : nullptr;
      const T* Gp = G.data_ptr<T>();
      const T* Hpp = Hp.data_ptr<T>();
      const T* Cpp = Cp.data_ptr<T>();
      const T* RTp = RT.data_ptr<T>();
      const T* rdp = rec_drop.defined() ? rec_drop.data_ptr<T>() : nullptr;
      const bool* kp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      T* dhp = dh.data_ptr<T>();
      T* dcp = dc.data_ptr<T>();
      T* dZp = dZ.data_ptr<T>();
      T* dbp = needs[3] ? db_rows.data_ptr<T>() : nullptr;
      over_chunks(B, U * 4 * U, [&](int64_t b0, int64_t b1) {
        backward_loop<T>(b1 - b0, Tn, U, dYp ? dYp + b0 * (seq ? Tn : 1) * U : nullptr, Gp + b0 * Tn * GU,
                         Hpp + b0 * Tn * U, Cpp + b0 * Tn * U, RTp, rdp ? rdp + b0 * U : nullptr, B * U,
                         kp ? kp + b0 * Tn : nullptr, fl, dhp + b0 * U, dcp + b0 * U, dZp + b0 * Tn * GU,
                         dbp ? dbp + b0 * GU : nullptr);
      });
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

// ----- streaming: one step on preallocated buffers --------------------------------------------------
// xh [B, D+U] holds (x_t, h) side by side so the input and recurrent products are one product
// against W = [kernel; recurrent_kernel] [D+U, 4U]. W is kept packed in panels (small_gemm.h):
// panel p holds the four gates' columns of units [p*UP, (p+1)*UP) (UP = kPanel/4, zero columns
// past U), contiguous, so one register tile gives all four gates of UP units and the gate math
// follows at once; with several threads each takes a range of panels (its share of W stays in
// its core's L2 from step to step). The object keeps references to the weight tensors and
// re-packs them when their in-place version changes. step(x) writes h into a new [B, U] tensor
// (one allocation; never aliased with the state), or returns None when x is not a tensor of
// the weights' dtype (the caller converts it).
struct LSTMStep {
  torch::Tensor kernel_ref, rec_ref, bias_ref;
  int64_t kv = -1, rv = -1, bv = -1;
  torch::Tensor Wp, bias_p, xh, c, z;
  int64_t B, D, U, UP, P, NB;
  int act, ract;
  // Splitting a step over the threads pays only while they get a core at once; on a busy machine
  // a split step can wait milliseconds for one. A split step far slower than the best one turns
  // splitting off for `backoff` steps (doubling while that recurs, halving after a good split).
  double best_split_s = 1e300;
  int64_t serial_steps = 0, backoff = 64;
  LSTMStep(torch::Tensor kernel, torch::Tensor rec, c10::optional<torch::Tensor> bias_o, int64_t batch, int64_t act_,
           int64_t ract_)
      : kernel_ref(kernel), rec_ref(rec), bias_ref(opt(bias_o)), B(batch), act(static_cast<int>(act_)),
        ract(static_cast<int>(ract_)) {
    D = kernel.size(0);
    U = rec.size(0);
    NB = kernel.scalar_type() == at::kFloat ? small_gemm::kPanel<float> : small_gemm::kPanel<double>;
    UP = NB / 4;
    P = (U + UP - 1) / UP;
    auto o = kernel.options().requires_grad(false);
    xh = torch::zeros({B, D + U}, o);
    c = torch::zeros({B, U}, o);
    z = torch::empty({B, P * NB}, o);
    refresh();
  }
  // [rows, 4U] gate-major columns -> [P, rows, NB] panels (zero columns past U)
  torch::Tensor pack(const torch::Tensor& w) const {
    const int64_t rows = w.size(0);
    auto padded = at::constant_pad_nd(w.reshape({rows, 4, U}), {0, P * UP - U});
    return padded.view({rows, 4, P, UP}).permute({2, 0, 1, 3}).contiguous().view({P, rows, NB});
  }
  void refresh() {
    at::NoGradGuard ng;
    Wp = pack(at::cat({kernel_ref.detach(), rec_ref.detach()}, 0));
    bias_p = bias_ref.defined() ? pack(bias_ref.detach().reshape({1, 4 * U})).view({P, NB})
                                : torch::zeros({P, NB}, Wp.options());
    kv = kernel_ref._version();
    rv = rec_ref._version();
    bv = bias_ref.defined() ? bias_ref._version() : -1;
  }
  void set_state(torch::Tensor h, torch::Tensor c_) {
    at::NoGradGuard ng;
    xh.narrow(1, D, U).copy_(h);
    c.copy_(c_);
  }
  std::vector<torch::Tensor> state() { return {xh.narrow(1, D, U).clone(), c.clone()}; }

  // panels [p0, p1): z = bias + xh @ W for their columns, then the gate math of their units
  template <typename T>
  void panels(int64_t p0, int64_t p1, T* op) {
    const int64_t DU = D + U, ldz = P * NB;
    const T* xhp = xh.data_ptr<T>();
    const T* Wpp = Wp.data_ptr<T>();
    const T* bp = bias_p.data_ptr<T>();
    T* zp = z.data_ptr<T>();
    T* cp = c.data_ptr<T>();
    for (int64_t p = p0; p < p1; ++p) {
      T* zpan = zp + p * NB;
      for (int64_t b = 0; b < B; ++b) std::memcpy(zpan + b * ldz, bp + p * NB, NB * sizeof(T));
      if (B <= kSmallBatch) {
        small_gemm::panel_gemm_acc<T>(B, DU, xhp, DU, Wpp + p * DU * NB, zpan, ldz);
      } else {
        gemm_nn<T>(B, NB, DU, xhp, DU, Wpp + p * DU * NB, NB, T(1), zpan, ldz);
      }
      const int64_t u0 = p * UP, n = std::min(UP, U - u0);
      for (int64_t b = 0; b < B; ++b) {
        T* zr = zpan + b * ldz;
        if (act == ract) {
          act_inplace(act, zr, NB);
        } else {
          act_inplace(ract, zr, 2 * UP);
          act_inplace(act, zr + 2 * UP, UP);
          act_inplace(ract, zr + 3 * UP, UP);
        }
        T* cr = cp + b * U + u0;
        T* hr = op + b * U + u0;
        for (int64_t j = 0; j < n; ++j) {
          T cv = zr[UP + j] * cr[j] + zr[j] * zr[2 * UP + j];
          cr[j] = cv;
          hr[j] = cv;
        }
        act_inplace(act, hr, n);
        for (int64_t j = 0; j < n; ++j) hr[j] *= zr[3 * UP + j];
      }
    }
  }

  template <typename T>
  void run(const T* x, T* op) {
    T* xhp = xh.data_ptr<T>();
    const int64_t DU = D + U;
    for (int64_t b = 0; b < B; ++b) std::memcpy(xhp + b * DU, x + b * D, D * sizeof(T));
    const int64_t nt = std::min<int64_t>(at::get_num_threads(), P);
    const bool split = nt > 1 && B <= kSmallBatch && B * DU * 4 * U >= kStreamParallelWork && !at::in_parallel_region();
    if (split && serial_steps == 0) {
      const auto start = std::chrono::steady_clock::now();
      at::parallel_for(0, nt, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) panels<T>(P * k / nt, P * (k + 1) / nt, op);
      });
      const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      best_split_s = std::min(best_split_s, took);
      if (took > 8 * best_split_s + 50e-6) {
        serial_steps = backoff;
        backoff = std::min<int64_t>(2 * backoff, int64_t(1) << 16);
      } else {
        backoff = std::max<int64_t>(64, backoff / 2);
      }
    } else if (split) {
      --serial_steps;
      panels<T>(0, P, op);
    } else if (B > kSmallBatch) {
      int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
      panels<T>(0, P, op);
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
    } else {
      panels<T>(0, P, op);
    }
    for (int64_t b = 0; b < B; ++b) std::memcpy(xhp + b * DU + D, op + b * U, U * sizeof(T));
  }
  torch::Tensor step(const torch::Tensor& x) {
    if (x.scalar_type() != Wp.scalar_type() || !x.device().is_cpu()) return torch::Tensor();
    TORCH_CHECK_VALUE(x.dim() <= 2 && x.dim() >= 1 && x.size(-1) == D && x.numel() == B * D,
                "x_t: expected shape (", B, ", ", D, "), got ", x.sizes());
    if (kernel_ref._version() != kv || rec_ref._version() != rv || (bias_ref.defined() && bias_ref._version() != bv))
      refresh();
    auto xc = x.is_contiguous() ? x : x.contiguous();
    at::Tensor out = at::detail::empty_cpu({B, U}, Wp.scalar_type(), false);
    if (Wp.scalar_type() == at::kFloat) run<float>(xc.data_ptr<float>(), out.data_ptr<float>());
    else run<double>(xc.data_ptr<double>(), out.data_ptr<double>());
    return out;
  }
};

#include "lstm_variants.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("variant_forward", &variant_forward, "LSTM variants forward (fused)");
  m.def("variant_backward", &variant_backward, "LSTM variants backward (BPTT)");
  m.def("forward", &lstm_forward, "LSTM forward (fused)");
  m.def("set_stream_parallel_work", [](int64_t w) { return std::exchange(kStreamParallelWork, w); },
        "multiply-adds of a streaming step from which its units are split over the threads; returns the previous");
  m.def("set_pack_min_work", [](int64_t w) { return std::exchange(kPackMinWork, w); },
        "multiply-adds of a step's product from which its right operand is packed; returns the previous");
  m.def("backward", &lstm_backward, "LSTM backward (BPTT)");
  m.def(
      "pooled_empty",
      [](std::vector<int64_t> sizes, torch::Tensor like) { return buffer_pool::empty(sizes, like.options()); },
      "an uninitialised contiguous CPU tensor of like's dtype from the buffer pool");
  m.def("pool_stats", [] { return buffer_pool::Pool::instance().stats(); },
        "the buffer pool's (idle bytes, idle blocks, allocations it served from idle blocks)");
  m.def("pool_clear", [] { return buffer_pool::Pool::instance().clear(); },
        "gives the buffer pool's idle blocks back to the OS; returns their bytes");
  m.def("cell_step", &cell_step, "the cell call's lean route: [out, h, c]; [None]: use autograd; []: not this route");
  pybind11::class_<LSTMStep>(m, "LSTMStep")
      .def(pybind11::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, int64_t>())
      .def("refresh", &LSTMStep::refresh)
      .def("set_state", &LSTMStep::set_state)
      .def("state", &LSTMStep::state)
      .def("step", &LSTMStep::step);
}
