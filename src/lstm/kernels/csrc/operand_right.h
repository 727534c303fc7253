// The right operand B [K,N] of a step loop's low-precision products (low_precision.h), the same at
// every step: with bfloat16 on a CPU with AMX, copied once into the tiles' layout and multiplied
// on the tiles by this module's own kernel; else, where operand_in_hardware, MKL's GEMM
// (operand_gemm) on B in place; else widened once to float32 for StepOperand's products.
// MKL's bf16 GEMM lays B out again at every call (libtorch_cpu exports no packed bf16 GEMM);
// measured against it, the LSTM in mixed_bfloat16, 2 threads, MKL -> tiles: forward
// (64,100,128,256) 9.3 -> 6.7 ms, (256,50,64,512) 37.1 -> 31.0 ms; training 29.0 -> 25.2 ms and
// 151 -> 130 ms.
#pragma once

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "low_precision.h"

namespace lstm_core {

// Whether a step loop's products with low-precision operands over `rows` rows run on OperandRight
// (else on StepOperand's float32 products of the same rounded values): from kLowGemmRows rows, where
// operand_in_hardware (low_precision.h). Without, MKL's low-precision GEMM widens both operands at
// every call, slower than float32's on a right operand packed once (an AMD EPYC with AVX2 only, 2 threads,
// mixed_bfloat16 at (32,80,100,64), its time against float32's, MKL -> float32 products: forward
// LSTM 1.25 -> 1.10, GRU 1.11 -> 1.08, SimpleRNN 1.93 -> 1.07).
bool low_step_products(Operand op, int64_t rows);

class OperandRight {
 public:
  // B [K, N] (ldb its row stride) in `op`, for products with M rows; B is read by MKL's GEMM at
  // every call, so it must outlive this
  OperandRight(Operand op, int64_t M, int64_t N, int64_t K, const uint16_t* B, int64_t ldb);

  // C[M, N] (+)= A[M, K] @ B with A in the operand type (lda its row stride); `accumulate` adds to C
  void mm(const uint16_t* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
    mm(M_, A, lda, accumulate, C, ldc);
  }
  // the same with A in float32, rounded to the operand type on the way
  void mm(const float* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
    mm(M_, A, lda, accumulate, C, ldc);
  }
  // the same for the first `rows` rows only (rows <= M)
  void mm(int64_t rows, const uint16_t* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const;
  void mm(int64_t rows, const float* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const;

 private:
  void tiles_mm(int64_t rows, const uint16_t* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const;
  // C (+)= the first `rows` rows of a_widened_ @ B, on widened_
  void widened_mm(int64_t rows, bool accumulate, float* C, int64_t ldc) const;

  Operand op_;
  int64_t M_, N_, K_;
  const uint16_t* B_;
  int64_t ldb_;
  bool tiles_;
  int64_t k_blocks_, n_blocks_;      // B in tiles: 32 rows (16 VNNI pairs) x 16 columns each
  std::vector<uint16_t> packed_;     // [n_blocks, k_blocks, 16, 32]: tile (n, k), pairs of rows interleaved
  // A in the operand type: for the tiles its rows and columns padded to them, else [M, K]
  mutable std::vector<uint16_t> a_;
  // without the tiles or the type's instructions: B widened, its products, and A's rows widened (or
  // rounded, from float32) for them
  std::vector<float> widened_b_;
  std::optional<StepOperand<float>> widened_;
  mutable std::vector<float> a_widened_;
};

// A step loop's product with its right operand B [K,N]: StepOperand's, or with low-precision
// operands (float, B's bits given, low_step_products) OperandRight's, A's rows rounded to
// the operand type on the way (h holds rounded values already; a gradient is rounded as
// torch.autocast's backward rounds it).
template <typename T>
class StepProduct {
 public:
  StepProduct(int64_t M, int64_t N, int64_t K, const T* B, int64_t ldb, int64_t steps, int operand,
              const uint16_t* B_low)
      : float_(M, N, K, B, ldb, low_route(M, operand, B_low) ? 0 : steps) {
    if (low_route(M, operand, B_low)) low_.emplace(Operand(operand), M, N, K, B_low, ldb);
  }

  // C[rows, N] += A[rows, K] @ B, rows <= M (the loop's rows that take the step)
  void acc(int64_t rows, const T* A, int64_t lda, T* C, int64_t ldc) const { product(rows, A, lda, true, C, ldc); }
  // C[rows, N] = A[rows, K] @ B
  void set(int64_t rows, const T* A, int64_t lda, T* C, int64_t ldc) const { product(rows, A, lda, false, C, ldc); }

 private:
  void product(int64_t rows, const T* A, int64_t lda, bool accumulate, T* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (low_) return low_->mm(rows, A, lda, accumulate, C, ldc);
    }
    if (accumulate) float_.acc(rows, A, lda, C, ldc);
    else float_.set(rows, A, lda, C, ldc);
  }

  static bool low_route(int64_t M, int operand, const uint16_t* B_low) {
    return std::is_same_v<T, float> && operand && B_low && low_step_products(Operand(operand), M);
  }

  StepOperand<T> float_;
  std::optional<OperandRight> low_;
};

}  // namespace lstm_core
