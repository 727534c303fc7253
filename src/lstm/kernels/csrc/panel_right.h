// The right operand B [K, N] (float32) of a step loop's products, packed once into 16-column
// panels for a register-tiled kernel of this module's own (AVX-512, or AVX2 in the x86-64-v3
// build): what StepOperand uses instead of MKL on CPUs that are not Intel's, where MKL runs its
// AVX2 code, with a call's overhead that small products feel (measured, 1 thread, [M,K] @ [K,N] at
// the loops' shapes: on an AMD EPYC with AVX-512, M 16-128, K 164-576, N 256-2048, MKL 81-107
// GFLOP/s, these panels 222-243; on an AVX2-only AMD EPYC at 2.45 GHz, K 64, N 256, M 3-11, MKL
// 17-48, the panels 57-89, and even at M 1151, K 100: 60 against 58).
#pragma once

#include <cstdint>
#include <vector>

namespace lstm_core {

// StepOperand uses the panels: this build has their kernel (x86-64-v4) and the setting says so
// (by default, the CPU is not Intel's)
bool panels_preferred();
// The setting (tests run both routes on any CPU): -1 by the CPU, 0 never, 1 always; returns the previous
int set_panels(int mode);

class PanelRight {
 public:
  // B [K, N] (ldb its row stride), copied
  PanelRight(int64_t N, int64_t K, const float* B, int64_t ldb);

  // C[rows, N] (+)= A[rows, K] @ B (A's rows lda apart); `accumulate` adds to C. Spread over the
  // threads by column panels when the product is big and the caller is not in a parallel region.
  void mm(int64_t rows, const float* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const;

 private:
  void columns(int64_t first_panel, int64_t end_panel, int64_t rows, const float* A, int64_t lda, bool accumulate,
               float* C, int64_t ldc) const;

  int64_t N_, K_, panels_count_;
  std::vector<float> panels_;  // [panels_count, K, 16]: panel p holds columns [16p, 16p + 16), zeros past N
};

}  // namespace lstm_core
