// PanelRight (panel_right.h): blocks of up to 4 rows x 4 panels (64 columns) in 16 AVX-512
// accumulators; per k, four panel rows loaded and each A value broadcast against them.
#include "panel_right.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#if defined(__x86_64__) && defined(__AVX512F__)
#define LSTM_PANELS 1
#include <immintrin.h>
#endif

namespace lstm_core {

namespace {

constexpr int64_t kWidth = 16;  // a panel's columns
// multiply-adds of a product from which its panels are spread over the threads (as OperandRight's)
constexpr int64_t kParallelProduct = 1 << 22;

#ifdef LSTM_PANELS

// C's rows [MR] x panels [p0, p0 + NR) (the last panel's columns valid by `last`)
template <int MR, int NR>
__attribute__((target("avx512f"))) void panel_block(const float* A, int64_t lda, const float* panels, int64_t K,
                                                     int64_t p0, __mmask16 last, bool accumulate, float* C,
                                                     int64_t ldc) {
  __m512 sums[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) {
      const __mmask16 valid = j == NR - 1 ? last : __mmask16(0xffff);
      sums[r][j] = accumulate ? _mm512_maskz_loadu_ps(valid, C + r * ldc + j * kWidth) : _mm512_setzero_ps();
    }
  const float* panel[NR];
  for (int j = 0; j < NR; ++j) panel[j] = panels + (p0 + j) * K * kWidth;
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_ps(panel[j] + k * kWidth);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) sums[r][j] = _mm512_fmadd_ps(a, b[j], sums[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j)
      _mm512_mask_storeu_ps(C + r * ldc + j * kWidth, j == NR - 1 ? last : __mmask16(0xffff), sums[r][j]);
}

template <int MR>
void panel_rows(int NR, const float* A, int64_t lda, const float* panels, int64_t K, int64_t p0, __mmask16 last,
                bool accumulate, float* C, int64_t ldc) {
  if (NR == 4) panel_block<MR, 4>(A, lda, panels, K, p0, last, accumulate, C, ldc);
  else if (NR == 3) panel_block<MR, 3>(A, lda, panels, K, p0, last, accumulate, C, ldc);
  else if (NR == 2) panel_block<MR, 2>(A, lda, panels, K, p0, last, accumulate, C, ldc);
  else panel_block<MR, 1>(A, lda, panels, K, p0, last, accumulate, C, ldc);
}

#endif  // LSTM_PANELS

}  // namespace

namespace {
int panels_setting = -1;  // set_panels
}  // namespace

bool panels_preferred() {
#ifdef LSTM_PANELS
  static const bool not_intel = !__builtin_cpu_is("intel");
  return panels_setting < 0 ? not_intel : panels_setting > 0;
#else
  return false;
#endif
}

int set_panels(int mode) { return std::exchange(panels_setting, mode); }

PanelRight::PanelRight(int64_t N, int64_t K, const float* B, int64_t ldb)
    : N_(N), K_(K), panels_count_((N + kWidth - 1) / kWidth), panels_(panels_count_ * K * kWidth, 0.0f) {
  for (int64_t p = 0; p < panels_count_; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = p * kWidth; n < std::min(N, (p + 1) * kWidth); ++n)
        panels_[(p * K + k) * kWidth + n % kWidth] = B[k * ldb + n];
}

void PanelRight::columns(int64_t first_panel, int64_t end_panel, int64_t rows, const float* A, int64_t lda,
                         bool accumulate, float* C, int64_t ldc) const {
#ifdef LSTM_PANELS
  for (int64_t p0 = first_panel; p0 < end_panel; p0 += 4) {
    const int NR = int(std::min<int64_t>(4, end_panel - p0));
    const int64_t tail = N_ - (p0 + NR - 1) * kWidth;  // the last panel's valid columns
    const __mmask16 last = tail >= kWidth ? __mmask16(0xffff) : __mmask16((1u << tail) - 1);
    float* Cp = C + p0 * kWidth;
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4)
      panel_rows<4>(NR, A + m * lda, lda, panels_.data(), K_, p0, last, accumulate, Cp + m * ldc, ldc);
    for (; m < rows; ++m)
      panel_rows<1>(NR, A + m * lda, lda, panels_.data(), K_, p0, last, accumulate, Cp + m * ldc, ldc);
  }
#endif
}

void PanelRight::mm(int64_t rows, const float* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
  if (rows == 0 || N_ == 0) return;
  const int64_t groups = (panels_count_ + 3) / 4;  // of 4 panels, each one block column
  if (rows * N_ * K_ >= kParallelProduct && groups > 1 && !at::in_parallel_region() && at::get_num_threads() > 1) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      columns(4 * g0, std::min(panels_count_, 4 * g1), rows, A, lda, accumulate, C, ldc);
    });
  } else {
    columns(0, panels_count_, rows, A, lda, accumulate, C, ldc);
  }
}

}  // namespace lstm_core
