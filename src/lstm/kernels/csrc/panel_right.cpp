// PanelRight (panel_right.h): per k, a block's panel rows loaded and each of its A values broadcast
// against them. AVX-512: blocks of up to 4 rows x 4 panels (64 columns) in 16 accumulators; AVX2:
// 3 rows x 2 panels (32 columns, each panel two 8-column halves) in 12 of its 16 registers.
#include "panel_right.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#if defined(__x86_64__) && defined(__AVX512F__)
#define LSTM_PANELS 1
#define LSTM_PANELS_AVX512 1
#include <immintrin.h>
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define LSTM_PANELS 1
#include <immintrin.h>
#endif

namespace lstm_core {

namespace {

constexpr int64_t kWidth = 16;  // a panel's columns
// a block's panels, and the multiply-adds of a product from which its panels are spread over the
// threads: about 35 us of one thread's work either way (AVX2 does half of AVX-512's per cycle;
// measured, 2 threads, AVX2: the input product of (2,80,100,64), 4.1M multiply-adds, on one
// thread was 0.9x MKL's forward)
#ifdef LSTM_PANELS_AVX512
constexpr int64_t kBlockPanels = 4;
constexpr int64_t kParallelProduct = 1 << 22;
#else
constexpr int64_t kBlockPanels = 2;
constexpr int64_t kParallelProduct = 1 << 20;
#endif

#ifdef LSTM_PANELS_AVX512

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

#elif defined(LSTM_PANELS)

// The lanes of a panel's two 8-column halves that hold valid columns, `valid` of its 16
struct HalfMasks {
  __m256i low, high;
};

inline HalfMasks half_masks(int64_t valid) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32(int(valid)), lanes),
          _mm256_cmpgt_epi32(_mm256_set1_epi32(int(valid) - 8), lanes)};
}

// C's rows [MR] x panels [p0, p0 + NR) (the last panel's columns valid by `last`, all where `full`)
template <int MR, int NR>
void panel_block(const float* A, int64_t lda, const float* panels, int64_t K, int64_t p0, const HalfMasks& last,
                 bool full, bool accumulate, float* C, int64_t ldc) {
  constexpr int H = 2 * NR;  // 8-column halves
  auto masked = [&](int h) { return !full && h >= H - 2; };
  auto mask = [&](int h) { return h == H - 2 ? last.low : last.high; };
  __m256 sums[MR][H];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < H; ++h) {
      float* c = C + r * ldc + h * 8;
      sums[r][h] = !accumulate  ? _mm256_setzero_ps()
                   : masked(h) ? _mm256_maskload_ps(c, mask(h))
                               : _mm256_loadu_ps(c);
    }
  const float* panel[NR];
  for (int j = 0; j < NR; ++j) panel[j] = panels + (p0 + j) * K * kWidth;
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[H];
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) b[h] = _mm256_loadu_ps(panel[h / 2] + k * kWidth + (h % 2) * 8);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) sums[r][h] = _mm256_fmadd_ps(a, b[h], sums[r][h]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < H; ++h) {
      float* c = C + r * ldc + h * 8;
      if (masked(h)) _mm256_maskstore_ps(c, mask(h), sums[r][h]);
      else _mm256_storeu_ps(c, sums[r][h]);
    }
}

template <int MR>
void panel_rows(int NR, const float* A, int64_t lda, const float* panels, int64_t K, int64_t p0,
                const HalfMasks& last, bool full, bool accumulate, float* C, int64_t ldc) {
  if (NR == 2) panel_block<MR, 2>(A, lda, panels, K, p0, last, full, accumulate, C, ldc);
  else panel_block<MR, 1>(A, lda, panels, K, p0, last, full, accumulate, C, ldc);
}

#endif  // LSTM_PANELS_AVX512, LSTM_PANELS

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
#if defined(LSTM_PANELS_AVX512)
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
#elif defined(LSTM_PANELS)
  for (int64_t p0 = first_panel; p0 < end_panel; p0 += 2) {
    const int NR = int(std::min<int64_t>(2, end_panel - p0));
    const int64_t tail = N_ - (p0 + NR - 1) * kWidth;  // the last panel's valid columns
    const bool full = tail >= kWidth;
    const HalfMasks last = half_masks(tail);
    float* Cp = C + p0 * kWidth;
    int64_t m = 0;
    for (; m + 3 <= rows; m += 3)
      panel_rows<3>(NR, A + m * lda, lda, panels_.data(), K_, p0, last, full, accumulate, Cp + m * ldc, ldc);
    if (rows - m == 2)
      panel_rows<2>(NR, A + m * lda, lda, panels_.data(), K_, p0, last, full, accumulate, Cp + m * ldc, ldc);
    else if (rows - m == 1)
      panel_rows<1>(NR, A + m * lda, lda, panels_.data(), K_, p0, last, full, accumulate, Cp + m * ldc, ldc);
  }
#endif
}

void PanelRight::mm(int64_t rows, const float* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
  if (rows == 0 || N_ == 0) return;
  const int64_t groups = (panels_count_ + kBlockPanels - 1) / kBlockPanels;  // each one block column
  if (rows * N_ * K_ >= kParallelProduct && groups > 1 && !at::in_parallel_region() && at::get_num_threads() > 1) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      columns(kBlockPanels * g0, std::min(panels_count_, kBlockPanels * g1), rows, A, lda, accumulate, C, ldc);
    });
  } else {
    columns(0, panels_count_, rows, A, lda, accumulate, C, ldc);
  }
}

}  // namespace lstm_core
