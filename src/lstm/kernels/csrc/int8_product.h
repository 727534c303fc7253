// Products with int8 operands and int32 accumulation, the numerics of a quantized recurrence
// (lstm.quantize; problem.py, Recurrence.quantized): the weights int8 with a scale per output
// column, the left operand (x, h) quantized per row as it comes. On AMX-INT8 tiles where the CPU
// has them (TDPBSSD), else on AVX512-VNNI (VPDPBUSD: A shifted to unsigned, the shift taken back
// with B's column sums), else a plain integer loop, all over the same packed weights: the same
// integer sums on every route, so the same results.
#pragma once

#include <cstdint>

namespace lstm_core {

// One row's dynamic quantization (problem.quantize_rows): with m = max|x|, q = x * (127 / m)
// rounded half to even (in [-127, 127]); returns the row's scale m / 127. A zero row gives q = 0
// (scale 0); a row with an infinity or a NaN gives q = 0 and a non-finite scale.
float quantize_row(const float* x, int64_t n, int8_t* q);

// The right operand B [K,N] (int8, column n scaled by column_scales[n]), packed once (pack) into
// AMX's tile layout: tiles of 64 rows x 16 columns, column block by column block, each tile's row
// r holding B[4r + i, j] at byte 4j + i (i < 4, j < 16; zeros past K and N); then 128 times each
// column's sum, int32 [N rounded up to 16] (what VNNI's unsigned shift of A adds).
class Int8Right {
 public:
  static constexpr int64_t kDepth = 64, kColumns = 16, kRows = 16;  // C [16,16] += A [16,64] @ B [64,16]

  static int64_t padded_depth(int64_t K) { return (K + kDepth - 1) / kDepth * kDepth; }
  static int64_t padded_rows(int64_t M) { return (M + kRows - 1) / kRows * kRows; }
  static int64_t padded_columns(int64_t N) { return (N + kColumns - 1) / kColumns * kColumns; }
  static int64_t packed_bytes(int64_t K, int64_t N) { return (padded_depth(K) + 4) * padded_columns(N); }
  // B [K,N] row-major into packed [packed_bytes(K, N)]
  static void pack(const int8_t* B, int64_t K, int64_t N, int8_t* packed);

  // packed and column_scales [N] must outlive this
  Int8Right(const int8_t* packed, const float* column_scales, int64_t K, int64_t N);

  // C[rows, N] (+)= (A[rows, K] @ B) * row_scales[m] * column_scales[n], each element's int32 sum
  // converted to float, then times (row scale * column scale); `accumulate` adds it to C. A's rows
  // are lda bytes apart; the tiles read padded_rows(rows) rows of padded_depth(K) bytes (what lies
  // past `rows` and K is never used, but must be readable).
  void mm(int64_t rows, const int8_t* A, int64_t lda, const float* row_scales, bool accumulate, float* C,
          int64_t ldc) const;

 private:
  void vnni_mm(int64_t rows, const int8_t* A, int64_t lda, const float* row_scales, bool accumulate, float* C,
               int64_t ldc) const;

  const int8_t* packed_;
  const int32_t* shifted_sums_;  // [padded_columns(N)] 128 * column sums
  const float* column_scales_;
  int64_t K_, N_, k_blocks_, n_blocks_;
  bool tiles_, vnni_;
};

}  // namespace lstm_core
