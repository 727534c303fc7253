// Small-M products for the single-step paths (batch <= 4): C[M,N] += A[M,K] @ B[K,N], row-major.
//
// With AVX-512 the accumulators of a block of C's columns stay in zmm registers for the whole K
// loop (a register tile): each k loads one row segment of B once and does M x NV FMAs with it,
// and C is read and written once per block instead of once per k. Blocks are NV vectors wide
// (NV = 8 for M <= 2, 4 for M = 3, 4: at most 16 accumulators plus the B loads in 32 registers);
// the last vector of a block is masked, so any N works. Other CPUs (and builds without
// AVX-512) take a portable loop with the same arithmetic order per output (k ascending).
//
// small_gemm_acc: B strided by ldb (the caller's weights). panel_gemm_acc: B packed as a panel
// of kPanel<T> contiguous columns (ldb = kPanel<T>), so the K loop streams one contiguous block
// of memory (what the streaming step packs its weights into).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace small_gemm {

// Width of a packed panel, in elements: 8 zmm vectors (128 floats / 64 doubles).
template <typename T>
constexpr int64_t kPanel = 512 / sizeof(T);

#ifdef __AVX512F__
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int L = 16;
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(Mask k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
  static void store(Mask k, float* p, V v) { _mm512_mask_storeu_ps(p, k, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
template <>
struct Vec<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int L = 8;
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V load(Mask k, const double* p) { return _mm512_maskz_loadu_pd(k, p); }
  static void store(Mask k, double* p, V v) { _mm512_mask_storeu_pd(p, k, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};

// One register tile: rows 0..M-1 of C, NV vectors of columns; the last vector under `last`.
template <typename T, int M, int NV>
inline void tile(int64_t K, const T* __restrict__ A, int64_t lda, const T* __restrict__ B, int64_t ldb,
                 T* __restrict__ C, int64_t ldc, typename Vec<T>::Mask last) {
  using W = Vec<T>;
  constexpr int L = W::L;
  const typename Vec<T>::Mask full = static_cast<typename Vec<T>::Mask>(~0u);
  typename W::V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = W::load(v == NV - 1 ? last : full, C + m * ldc + v * L);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    typename W::V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = W::load(v == NV - 1 ? last : full, b + v * L);
    for (int m = 0; m < M; ++m) {
      const typename W::V a = W::set1(A[m * lda + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = W::fma(a, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) W::store(v == NV - 1 ? last : full, C + m * ldc + v * L, acc[m][v]);
}

// A tile of nv (1..NVmax) vectors, the last one `tail` lanes wide (1..L).
template <typename T, int M>
inline void tile_n(int nv, int tail, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  const auto last = static_cast<typename Vec<T>::Mask>((1u << tail) - 1u);
  switch (nv) {
    case 1: tile<T, M, 1>(K, A, lda, B, ldb, C, ldc, last); break;
    case 2: tile<T, M, 2>(K, A, lda, B, ldb, C, ldc, last); break;
    case 3: tile<T, M, 3>(K, A, lda, B, ldb, C, ldc, last); break;
    case 4: tile<T, M, 4>(K, A, lda, B, ldb, C, ldc, last); break;
    case 5: if constexpr (M <= 2) tile<T, M, 5>(K, A, lda, B, ldb, C, ldc, last); break;
    case 6: if constexpr (M <= 2) tile<T, M, 6>(K, A, lda, B, ldb, C, ldc, last); break;
    case 7: if constexpr (M <= 2) tile<T, M, 7>(K, A, lda, B, ldb, C, ldc, last); break;
    default: if constexpr (M <= 2) tile<T, M, 8>(K, A, lda, B, ldb, C, ldc, last); break;
  }
}

// Rows 0..M-1 (M <= 4) over all N columns, in blocks of NVmax vectors.
template <typename T, int M>
inline void rows_acc(int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int L = Vec<T>::L;
  constexpr int NVmax = M <= 2 ? 8 : 4;
  int64_t n = 0;
  for (; n + NVmax * L <= N; n += NVmax * L) tile_n<T, M>(NVmax, L, K, A, lda, B + n, ldb, C + n, ldc);
  const int64_t rest = N - n;
  if (rest > 0) {
    const int nv = static_cast<int>((rest + L - 1) / L);
    tile_n<T, M>(nv, static_cast<int>(rest - (nv - 1) * L), K, A, lda, B + n, ldb, C + n, ldc);
  }
}

template <typename T>
inline void rows_acc_m(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc) {
  switch (M) {
    case 1: rows_acc<T, 1>(N, K, A, lda, B, ldb, C, ldc); break;
    case 2: rows_acc<T, 2>(N, K, A, lda, B, ldb, C, ldc); break;
    case 3: rows_acc<T, 3>(N, K, A, lda, B, ldb, C, ldc); break;
    default: rows_acc<T, 4>(N, K, A, lda, B, ldb, C, ldc); break;
  }
}
#endif

// The portable loop: k ascending per output, as the tiles.
template <typename T>
inline void portable_acc(int64_t M, int64_t N, int64_t K, const T* __restrict__ A, int64_t lda,
                         const T* __restrict__ B, int64_t ldb, T* __restrict__ C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * lda + k];
      const T* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// C[M,N] += A[M,K] @ B[K,N] for any M (groups of 4 rows), B strided by ldb.
template <typename T>
inline void small_gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                           int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#ifdef __AVX512F__
  for (int64_t m0 = 0; m0 < M; m0 += 4)
    rows_acc_m<T>(std::min<int64_t>(4, M - m0), N, K, A + m0 * lda, lda, B, ldb, C + m0 * ldc, ldc);
#else
  portable_acc<T>(M, N, K, A, lda, B, ldb, C, ldc);
#endif
}

// C[M, kPanel] += A[M,K] @ panel[K, kPanel] (the panel contiguous, row stride kPanel).
template <typename T>
inline void panel_gemm_acc(int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, T* C, int64_t ldc) {
  small_gemm_acc<T>(M, kPanel<T>, K, A, lda, panel, kPanel<T>, C, ldc);
}

}  // namespace small_gemm
