// The LSTM's one-step routes over raw buffers (rnn.h): lstm::SingleStep, a tiny batch's step
// from unpacked weights (the Keras cell call), and lstm::StreamingStep, streaming inference on
// weights packed in panels.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "gemm.h"
#include "lstm_cell.h"
#include "rnn.h"
#include "simd.h"
#include "small_gemm.h"
#include "threads.h"

namespace lstm_core {
namespace lstm {

int64_t kStreamParallelWork = int64_t(1) << 17;

template <typename T>
SingleStep<T>::SingleStep(int64_t batch, int64_t input_size, int64_t units, int act, int ract)
    : B_(batch), D_(input_size), U_(units), act_(act), ract_(ract) {}

template <typename T>
void SingleStep<T>::run(const T* x, const T* kernel, const T* R, const T* bias, const T* h0, const T* c0,
                        const bool* keep, T* Y, T* hT, T* cT) const {
  const int64_t B = B_, D = D_, U = U_, GU = 4 * U;
  T z[4 * 1024];
  std::vector<T> zv;
  T* zp = z;
  if (B * GU > 4 * 1024) { zv.resize(B * GU); zp = zv.data(); }
  for (int64_t b = 0; b < B; ++b) {
    if (bias) std::memcpy(zp + b * GU, bias, GU * sizeof(T));
    else std::fill(zp + b * GU, zp + (b + 1) * GU, T(0));
  }
  small_gemm::small_gemm_acc<T>(B, GU, D, x, D, kernel, GU, zp, GU);
  small_gemm::small_gemm_acc<T>(B, GU, U, h0, U, R, GU, zp, GU);
  for (int64_t b = 0; b < B; ++b) {
    if (keep == nullptr || keep[b]) {
      gate_row(zp + b * GU, c0 + b * U, cT + b * U, hT + b * U, U, act_, ract_);
      std::memcpy(Y + b * U, hT + b * U, U * sizeof(T));
    } else {
      std::memcpy(hT + b * U, h0 + b * U, U * sizeof(T));
      std::memcpy(cT + b * U, c0 + b * U, U * sizeof(T));
      std::fill(Y + b * U, Y + (b + 1) * U, T(0));  // the first step: no previous output
    }
  }
}

template class SingleStep<float>;
template class SingleStep<double>;

StreamingStep::StreamingStep(int64_t batch, int64_t input_size, int64_t units, int64_t panel_width, int act,
                             int ract)
    : B_(batch), D_(input_size), U_(units), UP_(panel_width / 4), P_((units + UP_ - 1) / UP_), NB_(panel_width),
      act_(act), ract_(ract) {}

// panels [p0, p1): z = bias + xh @ W for their columns, then the gate math of their units
template <typename T>
void StreamingStep::run_panels(int64_t p0, int64_t p1, const T* xh, const T* W, const T* bias, T* z, T* c,
                               T* h) const {
  const int64_t B = B_, D = D_, U = U_, UP = UP_, P = P_, NB = NB_;
  const int act = act_, ract = ract_;
  const int64_t DU = D + U, ldz = P * NB;
  for (int64_t p = p0; p < p1; ++p) {
    T* zpan = z + p * NB;
    for (int64_t b = 0; b < B; ++b) std::memcpy(zpan + b * ldz, bias + p * NB, NB * sizeof(T));
    if (B <= kSmallBatch) {
      small_gemm::panel_gemm_acc<T>(B, DU, xh, DU, W + p * DU * NB, zpan, ldz);
    } else {
      gemm_nn<T>(B, NB, DU, xh, DU, W + p * DU * NB, NB, T(1), zpan, ldz);
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
      T* cr = c + b * U + u0;
      T* hr = h + b * U + u0;
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
void StreamingStep::run(const T* x, T* xh, const T* W, const T* bias, T* z, T* c, T* h) {
  const int64_t B = B_, D = D_, U = U_, P = P_;
  const int64_t DU = D + U;
  for (int64_t b = 0; b < B; ++b) std::memcpy(xh + b * DU, x + b * D, D * sizeof(T));
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), P);
  const bool split = nt > 1 && B <= kSmallBatch && B * DU * 4 * U >= kStreamParallelWork && !at::in_parallel_region();
  if (split && serial_steps_ == 0) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, nt, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) run_panels<T>(P * k / nt, P * (k + 1) / nt, xh, W, bias, z, c, h);
    });
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best_split_s_ = std::min(best_split_s_, took);
    if (took > 8 * best_split_s_ + 50e-6) {
      serial_steps_ = backoff_;
      backoff_ = std::min<int64_t>(2 * backoff_, int64_t(1) << 16);
    } else {
      backoff_ = std::max<int64_t>(64, backoff_ / 2);
    }
  } else if (split) {
    --serial_steps_;
    run_panels<T>(0, P, xh, W, bias, z, c, h);
  } else if (B > kSmallBatch) {
    int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    run_panels<T>(0, P, xh, W, bias, z, c, h);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  } else {
    run_panels<T>(0, P, xh, W, bias, z, c, h);
  }
  for (int64_t b = 0; b < B; ++b) std::memcpy(xh + b * DU + D, h + b * U, U * sizeof(T));
}

template void StreamingStep::run<float>(const float*, float*, const float*, const float*, float*, float*, float*);
template void StreamingStep::run<double>(const double*, double*, const double*, const double*, double*, double*,
                                         double*);

}  // namespace lstm
}  // namespace lstm_core
