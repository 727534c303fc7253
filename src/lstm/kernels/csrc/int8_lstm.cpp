// The LSTM's int8 inference (rnn.h: lstm::forward_int8): each thread quantizes its rows' inputs
// for every step at once, then per step two int8 products into the gates' pre-activations (x_t's
// and h's, each row with its own scale), the gate math in float32, and h quantized for the next step.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "int8_product.h"
#include "lstm_cell.h"
#include "rnn.h"
#include "threads.h"

namespace lstm_core::lstm {

namespace {

void forward_rows(const Int8Weights& w, int64_t B, int64_t Tn, int64_t D, int64_t U, const float* x,
                  const bool* keep, const Flags& fl, const float* h0, const float* c0, float* Y, float* hT,
                  float* cT) {
  const int64_t GU = 4 * U, Dp = Int8Right::padded_depth(D), Up = Int8Right::padded_depth(U);
  const int64_t Bp = Int8Right::padded_rows(B);
  const Int8Right kernel(w.kernel, w.kernel_scales, D, GU), recurrent(w.recurrent, w.recurrent_scales, U, GU);
  // x quantized [Bp,T,Dp] (the tiles read whole tiles of rows) with its scales by step, [T,B]
  std::vector<int8_t> xq(Bp * Tn * Dp, 0), hq(Bp * Up, 0);
  std::vector<float> x_scales(Tn * B), h_scales(B), z(B * GU), c(c0, c0 + B * U), h(h0, h0 + B * U);
  std::vector<float> last(fl.seq ? 0 : B * U, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tn; ++t)
      x_scales[t * B + b] = quantize_row(x + (b * Tn + t) * D, D, &xq[(b * Tn + t) * Dp]);
    h_scales[b] = quantize_row(&h[b * U], U, &hq[b * Up]);
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = fl.backwards ? Tn - 1 - s : s;
    kernel.mm(B, &xq[t * Dp], Tn * Dp, &x_scales[t * B], false, z.data(), GU);
    if (w.bias)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < GU; ++j) z[b * GU + j] += w.bias[j];
    recurrent.mm(B, hq.data(), Up, h_scales.data(), true, z.data(), GU);
    for (int64_t b = 0; b < B; ++b) {
      const bool kept = keep == nullptr || keep[b * Tn + t];
      float* hrow = &h[b * U];
      if (kept) {
        gate_row(&z[b * GU], &c[b * U], &c[b * U], hrow, U, fl.act, fl.ract);
        h_scales[b] = quantize_row(hrow, U, &hq[b * Up]);
      }
      float* out = fl.seq ? Y + (b * Tn + s) * U : &last[b * U];
      if (kept) std::memcpy(out, hrow, U * sizeof(float));
      else if (fl.zero_out || (fl.seq && s == 0)) std::fill(out, out + U, 0.0f);
      else if (fl.seq) std::memcpy(out, out - U, U * sizeof(float));
    }
  }
  std::copy(h.begin(), h.end(), hT);
  std::copy(c.begin(), c.end(), cT);
  if (!fl.seq) std::copy(last.begin(), last.end(), Y);
}

}  // namespace

void forward_int8(const Int8Weights& w, int64_t B, int64_t Tn, int64_t D, int64_t U, const float* x,
                  const bool* keep, const Flags& fl, const float* h0, const float* c0, float* Y, float* hT,
                  float* cT) {
  // the products are not spread over threads: every thread takes rows of its own
  const int64_t chunks =
      at::in_parallel_region() || B < kMinChunkRows ? 1 : std::min<int64_t>(at::get_num_threads(), B);
  run_chunks(chunks, [&](int64_t chunk) {
    const int64_t b0 = chunk * B / chunks, b1 = (chunk + 1) * B / chunks;
    forward_rows(w, b1 - b0, Tn, D, U, x + b0 * Tn * D, keep ? keep + b0 * Tn : nullptr, fl, h0 + b0 * U,
                 c0 + b0 * U, Y + b0 * (fl.seq ? Tn : 1) * U, hT + b0 * U, cT + b0 * U);
  });
}

}  // namespace lstm_core::lstm
