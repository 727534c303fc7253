// Matrix products of the kernel core: BLAS (MKL's Fortran symbols, which libtorch_cpu exports)
// with a portable fallback, register tiles for tiny batches (small_gemm.h), and a step loop's
// right operand packed once (packed_gemm.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "packed_gemm.h"
#include "panel_right.h"
#include "small_gemm.h"

namespace lstm_core {

// ----- products ---------------------------------------------------------------------------------
// BLAS: MKL's Fortran symbols, which libtorch_cpu exports (what ATen's cpublas calls); weak, so a
// torch without them falls back to ATen's addmm on views of the same memory.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

inline bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

template <typename T>
inline void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                      T beta, T* c, int ldc);
template <>
inline void blas_gemm<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                             const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
inline void blas_gemm<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                              const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C[M,N] (+)= A[M,K] @ B[K,N]; beta 0 or 1.
template <typename T>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                    T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == T(0)) for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    return;
  }
  if (have_blas()) {
    // column-major: C^T[N,M] = B^T[N,K] A^T[K,M]
    blas_gemm<T>('N', 'N', (int)N, (int)M, (int)K, T(1), B, (int)ldb, A, (int)lda, beta, C, (int)ldc);
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) c.zero_();
  c.addmm_(a, b);
}

// Tiny batches: a register loop beats the BLAS call. C[M,N] += A[M,K] @ B[K,N] (small_gemm.h).
template <typename T>
inline void small_mm_acc(int64_t M, int64_t N, int64_t K, const T* __restrict__ A, int64_t lda,
                         const T* __restrict__ B, int64_t ldb, T* __restrict__ C, int64_t ldc) {
  small_gemm::small_gemm_acc<T>(M, N, K, A, lda, B, ldb, C, ldc);
}

// C[M,N] += A[M,K] @ B[K,N]: loop or BLAS by size.
constexpr int64_t kSmallBatch = 4;  // rows up to which the register tiles beat BLAS
template <typename T>
inline void mm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                   int64_t ldc) {
  if (M <= kSmallBatch) {
    small_mm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    gemm_nn<T>(M, N, K, A, lda, B, ldb, T(1), C, ldc);
  }
}

// C[M,N] = A[M,K] @ B[K,N]
template <typename T>
inline void mm_set(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                   int64_t ldc) {
  if (M <= kSmallBatch) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    small_mm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    gemm_nn<T>(M, N, K, A, lda, B, ldb, T(0), C, ldc);
  }
}

// The right operand B [K, N] of a loop's per-step product with M rows: on a CPU that is not Intel's
// (float32, the AVX-512 build), copied once into panel_right.h's panels for this module's own
// kernel; else packed once (float32, MKL's packed GEMM present) when the loop repeats a big
// product, else read in place by mm_acc / mm_set every step. (measured, 1 thread: 64,100,128,256
// inference 45 -> 36 ms, 256,50,64,512 training 840 -> 792 ms; below ~2M multiply-adds a step it
// gains nothing)
inline int64_t kPackMinWork = 1 << 21;  // multiply-adds of one step's product (set_pack_min_work)
constexpr int64_t kPackMinSteps = 4;  // packing costs about one step's product
template <typename T>
class StepOperand {
 public:
  StepOperand(int64_t M, int64_t N, int64_t K, const T* B, int64_t ldb, int64_t steps)
      : M_(M), N_(N), K_(K), B_(B), ldb_(ldb) {
    if constexpr (std::is_same_v<T, float>) {
      const bool repeated = M > kSmallBatch && K > 0 && N > 0 && steps >= kPackMinSteps;
      if (repeated && panels_preferred()) panels_.emplace(N, K, B, ldb);
      else if (repeated && packed_gemm_available() && M * N * K >= kPackMinWork) packed_.emplace(M, N, K, B, ldb);
    }
  }
  // C[M, N] += A[M, K] @ B
  void acc(const T* A, int64_t lda, T* C, int64_t ldc) const { acc(M_, A, lda, C, ldc); }
  // C[M, N] = A[M, K] @ B
  void set(const T* A, int64_t lda, T* C, int64_t ldc) const { set(M_, A, lda, C, ldc); }
  // the same for the first `rows` rows only (rows <= M)
  void acc(int64_t rows, const T* A, int64_t lda, T* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (panels_) return panels_->mm(rows, A, lda, true, C, ldc);
      if (packed_) return packed_->mm(rows, A, lda, 1.0f, C, ldc);
    }
    mm_acc<T>(rows, N_, K_, A, lda, B_, ldb_, C, ldc);
  }
  void set(int64_t rows, const T* A, int64_t lda, T* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (panels_) return panels_->mm(rows, A, lda, false, C, ldc);
      if (packed_) return packed_->mm(rows, A, lda, 0.0f, C, ldc);
    }
    mm_set<T>(rows, N_, K_, A, lda, B_, ldb_, C, ldc);
  }

 private:
  int64_t M_, N_, K_;
  const T* B_;
  int64_t ldb_;
  std::optional<PanelRight> panels_;
  std::optional<PackedRight> packed_;
};

}  // namespace lstm_core
