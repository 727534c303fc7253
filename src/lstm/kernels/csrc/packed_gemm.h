// MKL's packed GEMM (sgemm_pack / sgemm_compute, exported by libtorch_cpu next to sgemm_): a
// right operand that every step of a loop multiplies by is copied once into MKL's internal
// blocked layout, so the steps' products skip re-packing the same weights. (measured, 1 thread:
// [64, 384] @ [384, 1024], the [x_t, h] product at D,U = 128,256, 105 GFLOP/s plain, 160 packed;
// [256, 576] @ [576, 2048] 154 vs 168; neutral at K <= 256 or N <= 1024 with K = 1024.)
// float32 only (libtorch_cpu has no dgemm_pack); the symbols are weak, so a torch without them
// (ARM, another BLAS) reports unavailable and the caller keeps the plain GEMM.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
size_t sgemm_pack_get_size(const char*, const int*, const int*, const int*) __attribute__((weak));
void sgemm_pack(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
                float*) __attribute__((weak));
void sgemm_compute(const char*, const char*, const int*, const int*, const int*, const float*, const int*,
                   const float*, const int*, const float*, float*, const int*) __attribute__((weak));
}

inline bool packed_gemm_available() {
  return sgemm_pack_get_size != nullptr && sgemm_pack != nullptr && sgemm_compute != nullptr;
}

// Row-major B [K, N] packed for C[M, N] (+)= A[M, K] @ B with this M. Column-major, as MKL sees
// it, that is C^T = B^T A^T: B^T is MKL's packed "A".
class PackedRight {
 public:
  PackedRight(int64_t M, int64_t N, int64_t K, const float* B, int64_t ldb)
      : M_(static_cast<int>(M)), N_(static_cast<int>(N)), K_(static_cast<int>(K)) {
    const size_t bytes = sgemm_pack_get_size("A", &N_, &M_, &K_);
    // (c10's CPU allocator aligns to 64 bytes, as MKL asks of the packed buffer)
    buffer_ = at::empty({static_cast<int64_t>(bytes / sizeof(float) + 1)}, at::kFloat);
    const float one = 1.0f;
    const int ld = static_cast<int>(ldb);
    sgemm_pack("A", "N", &N_, &M_, &K_, &one, B, &ld, buffer_.data_ptr<float>());
  }

  // C[rows, N] = beta * C + A[rows, K] @ B, rows <= M (the packed B^T does not depend on them)
  void mm(int64_t rows, const float* A, int64_t lda, float beta, float* C, int64_t ldc) const {
    if (rows == 0) return;
    const int m = static_cast<int>(rows), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_compute("P", "N", &N_, &m, &K_, buffer_.data_ptr<float>(), &N_, A, &la, &beta, C, &lc);
  }

 private:
  int M_, N_, K_;
  at::Tensor buffer_;
};
