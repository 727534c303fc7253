// Small-M products for the single-step paths (batch <= 4): C[M,N] += A[M,K] @ B[K,N], row-major.
//
// With AVX-512 or AVX2 the accumulators of a block of C's columns stay in vector registers for the
// whole K loop (a register tile): each k loads one row segment of B once and does M x NV FMAs with
// it, and C is read and written once per block instead of once per k. Blocks are NV vectors wide
// (AVX-512: NV = 8 for M <= 2, 4 for M = 3, 4, at most 16 accumulators plus the B loads in 32
// registers; AVX2: NV = 4, 3, 2 for M = 2..4 in 16 registers, one row in the portable loop); the
// last vector of a block is masked, so any N works. Other builds take a portable loop with the same
// arithmetic order per output (k ascending). (measured, AVX2 on an AMD EPYC, one thread,
// [M, 64] @ [64, 256]: M = 2, 3, 4 from 24-30 GFLOP/s in the portable loop to 31-53)
//
// small_gemm_acc: B strided by ldb (the caller's weights). panel_gemm_acc: B packed as a panel
// of kPanel<T> contiguous columns (ldb = kPanel<T>), so the K loop streams one contiguous block
// of memory (what the streaming step packs its weights into).
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define SMALL_GEMM_TILES 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace small_gemm {

// Width of a packed panel, in elements: 8 zmm vectors (128 floats / 64 doubles).
template <typename T>
constexpr int64_t kPanel = 512 / sizeof(T);

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

#ifdef SMALL_GEMM_TILES
template <typename T>
struct Vec;
#ifdef __AVX512F__
template <>
struct Vec<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int L = 16;
  static Mask first(int lanes) { return static_cast<Mask>((1u << lanes) - 1u); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(Mask k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(Mask k, float* p, V v) { _mm512_mask_storeu_ps(p, k, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
template <>
struct Vec<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int L = 8;
  static Mask first(int lanes) { return static_cast<Mask>((1u << lanes) - 1u); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V load(Mask k, const double* p) { return _mm512_maskz_loadu_pd(k, p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void store(Mask k, double* p, V v) { _mm512_mask_storeu_pd(p, k, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
// a tile's widest block of vectors for M rows
constexpr int max_vectors(int M) { return M <= 2 ? 8 : 4; }
#else
template <>
struct Vec<float> {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int L = 8;
  static Mask first(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(Mask k, const float* p) { return _mm256_maskload_ps(p, k); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(Mask k, float* p, V v) { _mm256_maskstore_ps(p, k, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
template <>
struct Vec<double> {
  using V = __m256d;
  using Mask = __m256i;
  static constexpr int L = 4;
  static Mask first(int lanes) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(lanes), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V load(Mask k, const double* p) { return _mm256_maskload_pd(p, k); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void store(Mask k, double* p, V v) { _mm256_maskstore_pd(p, k, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
constexpr int max_vectors(int M) { return M <= 2 ? 4 : M == 3 ? 3 : 2; }
#endif

// One register tile: rows 0..M-1 of C, NV vectors of columns; the last vector under `last` when
// `Partial` (masked loads in the K loop cost AVX2 on AMD half its speed: only where needed).
template <typename T, int M, int NV, bool Partial>
inline void tile(int64_t K, const T* __restrict__ A, int64_t lda, const T* __restrict__ B, int64_t ldb,
                 T* __restrict__ C, int64_t ldc, typename Vec<T>::Mask last) {
  using W = Vec<T>;
  constexpr int L = W::L;
  auto load = [&](int v, const T* p) { return Partial && v == NV - 1 ? W::load(last, p) : W::load(p); };
  typename W::V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = load(v, C + m * ldc + v * L);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    typename W::V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(v, b + v * L);
    for (int m = 0; m < M; ++m) {
      const typename W::V a = W::set1(A[m * lda + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = W::fma(a, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) {
      if (Partial && v == NV - 1) W::store(last, C + m * ldc + v * L, acc[m][v]);
      else W::store(C + m * ldc + v * L, acc[m][v]);
    }
}

template <typename T, int M, int NV>
inline void tile(int tail, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (tail == Vec<T>::L) tile<T, M, NV, false>(K, A, lda, B, ldb, C, ldc, Vec<T>::first(tail));
  else tile<T, M, NV, true>(K, A, lda, B, ldb, C, ldc, Vec<T>::first(tail));
}

// A tile of nv (1..max_vectors(M)) vectors, the last one `tail` lanes wide (1..L).
template <typename T, int M>
inline void tile_n(int nv, int tail, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  switch (nv) {
    case 1: tile<T, M, 1>(tail, K, A, lda, B, ldb, C, ldc); break;
    case 2: tile<T, M, 2>(tail, K, A, lda, B, ldb, C, ldc); break;
    case 3: if constexpr (max_vectors(M) >= 3) tile<T, M, 3>(tail, K, A, lda, B, ldb, C, ldc); break;
    case 4: if constexpr (max_vectors(M) >= 4) tile<T, M, 4>(tail, K, A, lda, B, ldb, C, ldc); break;
    case 5: if constexpr (max_vectors(M) >= 5) tile<T, M, 5>(tail, K, A, lda, B, ldb, C, ldc); break;
    case 6: if constexpr (max_vectors(M) >= 6) tile<T, M, 6>(tail, K, A, lda, B, ldb, C, ldc); break;
    case 7: if constexpr (max_vectors(M) >= 7) tile<T, M, 7>(tail, K, A, lda, B, ldb, C, ldc); break;
    default: if constexpr (max_vectors(M) >= 8) tile<T, M, 8>(tail, K, A, lda, B, ldb, C, ldc); break;
  }
}

// Rows 0..M-1 (M <= 4) over all N columns, in blocks of NVmax vectors.
template <typename T, int M>
inline void rows_acc(int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int L = Vec<T>::L;
  constexpr int NVmax = max_vectors(M);
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
    case 1:
#ifdef __AVX512F__
      rows_acc<T, 1>(N, K, A, lda, B, ldb, C, ldc);
#else  // (AVX2: one row's tiles stream B in passes of 64 columns, slower than the loop's whole rows from K = 128)
      portable_acc<T>(1, N, K, A, lda, B, ldb, C, ldc);
#endif
      break;
    case 2: rows_acc<T, 2>(N, K, A, lda, B, ldb, C, ldc); break;
    case 3: rows_acc<T, 3>(N, K, A, lda, B, ldb, C, ldc); break;
    default: rows_acc<T, 4>(N, K, A, lda, B, ldb, C, ldc); break;
  }
}
#endif

// C[M,N] += A[M,K] @ B[K,N] for any M (groups of 4 rows), B strided by ldb.
template <typename T>
inline void small_gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                           int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#ifdef SMALL_GEMM_TILES
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
