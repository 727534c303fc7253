// Products with low-precision operands (bfloat16, float16) and float32 accumulation, the
// numerics of a bfloat16/float16 recurrence (problem.py, Recurrence: "Precision"): MKL's
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, which libtorch_cpu exports, where the CPU has
// the type's instructions (AMX or AVX512-BF16); else float32's products of the operands widened
// (the same products: a bf16 or f16 product is exact in float32). Operands are stored as uint16_t bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lstm_core {

enum class Operand : int { native = 0, bf16 = 1, f16 = 2 };  // native: the element type's own products

// float -> bfloat16 bits, rounded to nearest even (NaN kept a NaN); without a branch, so that
// loops over rows of it vectorise
inline uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, quiet_nan = (bits >> 16) | 0x40u;
  return uint16_t((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float from_bf16(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t to_f16(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

inline float from_f16(uint16_t x) {
  _Float16 h;
  std::memcpy(&h, &x, sizeof h);
  return static_cast<float>(h);
}

inline uint16_t to_operand(Operand op, float x) { return op == Operand::bf16 ? to_bf16(x) : to_f16(x); }
inline float from_operand(Operand op, uint16_t x) { return op == Operand::bf16 ? from_bf16(x) : from_f16(x); }

// x [n] rounded to the operand type: its bits into `bits`, x itself to the rounded value
inline void round_to_operand(Operand op, float* x, uint16_t* bits, int64_t n) {
  if (op == Operand::bf16) {
    for (int64_t j = 0; j < n; ++j) {
      bits[j] = to_bf16(x[j]);
      x[j] = from_bf16(bits[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      bits[j] = to_f16(x[j]);
      x[j] = from_f16(bits[j]);
    }
  }
}

// x [n] rounded to the operand type, in place
inline void round_in_place(Operand op, float* x, int64_t n) {
  if (op == Operand::bf16) {
    for (int64_t j = 0; j < n; ++j) x[j] = from_bf16(to_bf16(x[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = from_f16(to_f16(x[j]));
  }
}

// round_in_place for the element types: float's operand types only (a no-op for `native`)
template <typename T>
inline void round_operands(int operand, T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    if (operand) round_in_place(Operand(operand), x, n);
}

// Whether the CPU multiplies the operand type in hardware (bfloat16: AVX512-BF16, which every CPU
// with AMX has; float16: AVX512-FP16), as set_low_products says
bool operand_in_hardware(Operand op);
// The setting (tests run both routes on any CPU): -1 by the CPU, 0 never, 1 always; returns the previous
int set_low_products(int mode);

// Row-major C[M,N] = op(A) @ op(B) + beta C (beta 0 or 1), A and B in the operand type, C float32:
// op(A) [M,K] is A [M,K] (lda its row stride), or with trans_a A^T for A stored [K,M]; op(B)
// likewise. Where operand_in_hardware, MKL's low-precision GEMM; else float32's products of the
// operands widened (exactly), on the panels where they are preferred (panel_right.h).
void operand_gemm(Operand op, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                  int64_t ldb, float beta, float* C, int64_t ldc, bool trans_a = false, bool trans_b = false);

// rows of a chunk from which a low-precision product beats float's on the same values (measured, MKL,
// one thread: 16x256x64 3.5 vs 4.2 us, 8x512x128 7.0 vs 7.3 us, 4 rows: register tiles win)
constexpr int64_t kLowGemmRows = 16;

}  // namespace lstm_core
