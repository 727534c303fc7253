// OperandRight (operand_right.h): the AMX tile kernel, else MKL's GEMM, else float32's on B widened.
//
// AMX (Sapphire Rapids and later): eight tile registers of 16 rows x 64 bytes. TDPBF16PS adds
// A [16, 32] (bf16) @ B [32, 16] to C [16, 16] (float32), B's rows taken in pairs: tile row r holds
// B[2r, n], B[2r + 1, n] for n = 0..15 side by side (the "VNNI" layout B is packed into once).
// Each call runs blocks of 2 x 2 C tiles (C: tiles 0-3, A: 4-5, B: 6-7) over all of K, the column
// blocks spread over the threads (each thread keeps its part of B in its own cache, step after
// step). C's partial tiles (M or N not a multiple of 16) go through a buffer on the stack.
#include "operand_right.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "amx.h"

namespace lstm_core {

namespace {

constexpr int64_t kTileRows = 16, kTileColumns = 16, kTileDepth = 32;  // C [16,16] += A [16,32] @ B [32,16]
constexpr int64_t kTileElements = kTileDepth * kTileColumns;
// multiply-adds of a product from which its column blocks are spread over the threads (a few
// microseconds on the tiles, several times what starting a parallel region costs)
constexpr int64_t kParallelProduct = 1 << 22;

int64_t blocks_of(int64_t n, int64_t size) { return (n + size - 1) / size; }

#ifdef LSTM_AMX

using amx::memory_barrier;

// C's tile at `c` (rows x columns valid of 16 x 16) from the tile stored in `tile`
inline void merge_partial(const float* tile, float* c, int64_t ldc, int64_t rows, int64_t columns, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < columns; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + tile[r * kTileColumns + j] : tile[r * kTileColumns + j];
}

// C's MT x NT tiles (rows x columns of them valid) += A's MT tile rows @ B's NT column blocks,
// over k_blocks of 32; A's rows lda apart, B0 and B1 packed column blocks.
#define LSTM_TILE_START(tile, i, j)                                                               \
  if (accumulate && full(i, j)) _tile_loadd(tile, C + (i) * kTileRows * ldc + (j) * kTileColumns, ldc * 4); \
  else _tile_zero(tile);
#define LSTM_TILE_STORE(tile, i, j)                                                                       \
  if (full(i, j)) {                                                                                       \
    _tile_stored(tile, C + (i) * kTileRows * ldc + (j) * kTileColumns, ldc * 4);                          \
  } else {                                                                                                \
    _tile_stored(tile, partial, kTileColumns * 4);                                                        \
    memory_barrier();                                                                                     \
    merge_partial(partial, C + (i) * kTileRows * ldc + (j) * kTileColumns, ldc,                           \
                  std::min(kTileRows, rows - (i) * kTileRows), std::min(kTileColumns, columns - (j) * kTileColumns), \
                  accumulate);                                                                            \
  }

template <int MT, int NT>
__attribute__((target("amx-tile,amx-bf16"))) void tile_block(const uint16_t* A, int64_t lda, const uint16_t* B0,
                                                              const uint16_t* B1, int64_t k_blocks, bool accumulate,
                                                              float* C, int64_t ldc, int64_t rows, int64_t columns) {
  alignas(64) float partial[kTileRows * kTileColumns];
  auto full = [&](int64_t i, int64_t j) { return rows >= (i + 1) * kTileRows && columns >= (j + 1) * kTileColumns; };
  const int64_t a_stride = lda * 2;
  memory_barrier();
  LSTM_TILE_START(0, 0, 0)
  if constexpr (NT == 2) { LSTM_TILE_START(1, 0, 1) }
  if constexpr (MT == 2) { LSTM_TILE_START(2, 1, 0) }
  if constexpr (MT == 2 && NT == 2) { LSTM_TILE_START(3, 1, 1) }
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    _tile_loadd(4, A + kb * kTileDepth, a_stride);
    if constexpr (MT == 2) _tile_loadd(5, A + kTileRows * lda + kb * kTileDepth, a_stride);
    _tile_loadd(6, B0 + kb * kTileElements, 64);
    if constexpr (NT == 2) _tile_loadd(7, B1 + kb * kTileElements, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  LSTM_TILE_STORE(0, 0, 0)
  if constexpr (NT == 2) { LSTM_TILE_STORE(1, 0, 1) }
  if constexpr (MT == 2) { LSTM_TILE_STORE(2, 1, 0) }
  if constexpr (MT == 2 && NT == 2) { LSTM_TILE_STORE(3, 1, 1) }
  memory_barrier();
}

#undef LSTM_TILE_START
#undef LSTM_TILE_STORE

// x [n] rounded to bfloat16 (nearest even, as to_bf16)
__attribute__((target("avx512f,avx512bf16"))) void to_bf16_row(const float* x, uint16_t* out, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
  for (; j < n; ++j) out[j] = to_bf16(x[j]);
}

#endif  // LSTM_AMX

}  // namespace

OperandRight::OperandRight(Operand op, int64_t M, int64_t N, int64_t K, const uint16_t* B, int64_t ldb)
    : op_(op), M_(M), N_(N), K_(K), B_(B), ldb_(ldb),
      tiles_(op == Operand::bf16 && M > 0 && N > 0 && K > 0 && amx::usable<amx::kBf16>()),
      k_blocks_(tiles_ ? blocks_of(K, kTileDepth) : 0), n_blocks_(tiles_ ? blocks_of(N, kTileColumns) : 0),
      packed_(n_blocks_ * k_blocks_ * kTileElements, 0) {
  for (int64_t nb = 0; nb < n_blocks_; ++nb)
    for (int64_t kb = 0; kb < k_blocks_; ++kb) {
      uint16_t* tile = packed_.data() + (nb * k_blocks_ + kb) * kTileElements;
      for (int64_t k = kb * kTileDepth; k < std::min(K, (kb + 1) * kTileDepth); ++k) {
        const int64_t pair = (k % kTileDepth) / 2, half = k % 2;
        for (int64_t n = nb * kTileColumns; n < std::min(N, (nb + 1) * kTileColumns); ++n)
          tile[pair * 2 * kTileColumns + 2 * (n % kTileColumns) + half] = B[k * ldb + n];
      }
    }
  if (!tiles_ && !operand_in_hardware(op)) {
    widened_b_.resize(K * N);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) widened_b_[k * N + n] = from_operand(op, B[k * ldb + n]);
    widened_.emplace(M, N, K, widened_b_.data(), N, kPackMinSteps);
    a_widened_.resize(M * K);
    return;
  }
  // A goes through a_ when it is in float32, or (for the tiles) its rows or columns do not fill
  // whole tiles (zeros pad the rest, once here)
  a_.assign(tiles_ ? blocks_of(M, kTileRows) * kTileRows * k_blocks_ * kTileDepth : M * K, 0);
}

void OperandRight::widened_mm(int64_t rows, bool accumulate, float* C, int64_t ldc) const {
  if (accumulate) widened_->acc(rows, a_widened_.data(), K_, C, ldc);
  else widened_->set(rows, a_widened_.data(), K_, C, ldc);
}

void OperandRight::mm(int64_t rows, const uint16_t* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
  if (rows == 0 || N_ == 0) return;
  if (widened_) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < K_; ++k) a_widened_[m * K_ + k] = from_operand(op_, A[m * lda + k]);
    return widened_mm(rows, accumulate, C, ldc);
  }
  if (!tiles_) {
    operand_gemm(op_, rows, N_, K_, A, lda, B_, ldb_, accumulate ? 1.0f : 0.0f, C, ldc);
    return;
  }
  if (rows % kTileRows == 0 && K_ % kTileDepth == 0) return tiles_mm(rows, A, lda, accumulate, C, ldc);
  // (a partial tile's rows past `rows` hold earlier rows or zeros: their products are not stored)
  const int64_t padded = k_blocks_ * kTileDepth;
  for (int64_t m = 0; m < rows; ++m) std::memcpy(a_.data() + m * padded, A + m * lda, K_ * sizeof(uint16_t));
  tiles_mm(rows, a_.data(), padded, accumulate, C, ldc);
}

void OperandRight::mm(int64_t rows, const float* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
  if (rows == 0 || N_ == 0) return;
  if (widened_) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < K_; ++k) a_widened_[m * K_ + k] = from_operand(op_, to_operand(op_, A[m * lda + k]));
    return widened_mm(rows, accumulate, C, ldc);
  }
  if (!tiles_) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < K_; ++k) a_[m * K_ + k] = to_operand(op_, A[m * lda + k]);
    operand_gemm(op_, rows, N_, K_, a_.data(), K_, B_, ldb_, accumulate ? 1.0f : 0.0f, C, ldc);
    return;
  }
#ifdef LSTM_AMX
  const int64_t padded = k_blocks_ * kTileDepth;
  for (int64_t m = 0; m < rows; ++m) to_bf16_row(A + m * lda, a_.data() + m * padded, K_);
  tiles_mm(rows, a_.data(), padded, accumulate, C, ldc);
#endif
}

void OperandRight::tiles_mm(int64_t M, const uint16_t* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
#ifdef LSTM_AMX
  const int64_t m_tiles = blocks_of(M, kTileRows), n_pairs = blocks_of(n_blocks_, 2);
  auto run = [&](int64_t p0, int64_t p1) {
    amx::configure_tiles();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nb = 2 * p, n0 = nb * kTileColumns, columns = std::min(2 * kTileColumns, N_ - n0);
      const bool two_n = nb + 1 < n_blocks_;
      const uint16_t* B0 = packed_.data() + nb * k_blocks_ * kTileElements;
      const uint16_t* B1 = B0 + k_blocks_ * kTileElements;
      for (int64_t mt = 0; mt < m_tiles; mt += 2) {
        const int64_t rows = std::min(2 * kTileRows, M - mt * kTileRows);
        const uint16_t* Ab = A + mt * kTileRows * lda;
        float* Cb = C + mt * kTileRows * ldc + n0;
        if (mt + 1 < m_tiles) {
          if (two_n) tile_block<2, 2>(Ab, lda, B0, B1, k_blocks_, accumulate, Cb, ldc, rows, columns);
          else tile_block<2, 1>(Ab, lda, B0, B1, k_blocks_, accumulate, Cb, ldc, rows, columns);
        } else if (two_n) {
          tile_block<1, 2>(Ab, lda, B0, B1, k_blocks_, accumulate, Cb, ldc, rows, columns);
        } else {
          tile_block<1, 1>(Ab, lda, B0, B1, k_blocks_, accumulate, Cb, ldc, rows, columns);
        }
      }
    }
    amx::release_tiles();
  };
  if (M * N_ * K_ >= kParallelProduct && n_pairs > 1 && !at::in_parallel_region() && at::get_num_threads() > 1)
    at::parallel_for(0, n_pairs, 1, run);
  else
    run(0, n_pairs);
#endif
}

bool low_step_products(Operand op, int64_t rows) { return rows >= kLowGemmRows && operand_in_hardware(op); }

}  // namespace lstm_core
