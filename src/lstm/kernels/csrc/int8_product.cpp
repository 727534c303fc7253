// Int8Right (int8_product.h): AMX-INT8 tiles, and a plain integer loop where they cannot run.
// The tiles run blocks of 2 x 2 C tiles (C: tiles 0-3, A: 4-5, B: 6-7) over all of K; each block's
// int32 sums go through a buffer on the stack, where they are scaled into C. VNNI runs blocks of up
// to 4 rows x 4 column blocks in 16 registers, a packed tile row (4 values of k for 16 columns) being
// one register of B, four bytes of A's row broadcast against it.
#include "int8_product.h"

#include <algorithm>
#include <cmath>

#include "amx.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace lstm_core {

namespace {

constexpr int64_t kDepth = Int8Right::kDepth, kColumns = Int8Right::kColumns, kRows = Int8Right::kRows;
constexpr int64_t kTileBytes = kDepth * kColumns;

// C's block at `c` (rows x columns valid of 16 x 16) from its int32 sums
inline void scale_into(const int32_t* sums, const float* row_scales, const float* column_scales, bool accumulate,
                       float* c, int64_t ldc, int64_t rows, int64_t columns) {
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = row_scales[r];
    float* out = c + r * ldc;
    const int32_t* in = sums + r * kColumns;
    if (accumulate)
      for (int64_t j = 0; j < columns; ++j) out[j] += float(in[j]) * (row_scale * column_scales[j]);
    else
      for (int64_t j = 0; j < columns; ++j) out[j] = float(in[j]) * (row_scale * column_scales[j]);
  }
}

#ifdef LSTM_AMX

using amx::memory_barrier;

// The int32 sums of MT x NT tiles: A's MT tile rows (lda apart) @ B's NT packed column blocks, over
// k_blocks of 64, into sums [MT*NT][16*16] (tile (i, j) at i*NT + j)
template <int MT, int NT>
__attribute__((target("amx-tile,amx-int8"))) void tile_sums(const int8_t* A, int64_t lda, const int8_t* B0,
                                                             const int8_t* B1, int64_t k_blocks, int32_t* sums) {
  memory_barrier();
  _tile_zero(0);
  if constexpr (NT == 2) _tile_zero(1);
  if constexpr (MT == 2) _tile_zero(2);
  if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    _tile_loadd(4, A + kb * kDepth, lda);
    if constexpr (MT == 2) _tile_loadd(5, A + kRows * lda + kb * kDepth, lda);
    _tile_loadd(6, B0 + kb * kTileBytes, 64);
    if constexpr (NT == 2) _tile_loadd(7, B1 + kb * kTileBytes, 64);
    _tile_dpbssd(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbssd(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbssd(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) _tile_dpbssd(3, 5, 7);
  }
  constexpr int64_t kTileSums = kRows * kColumns;
  _tile_stored(0, sums, 64);
  if constexpr (NT == 2) _tile_stored(1, sums + kTileSums, 64);
  if constexpr (MT == 2) _tile_stored(2, sums + NT * kTileSums, 64);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, sums + 3 * kTileSums, 64);
  memory_barrier();
}

#endif  // LSTM_AMX

#if defined(__x86_64__) && defined(__AVX512F__)
#define LSTM_VNNI 1

// C's rows [MR] x column blocks [nb0, nb0 + NR) (columns valid: the last block's may be partial),
// over the packed tiles' rows: sums of (A + 128) B with VPDPBUSD, less 128 * column sums
template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_block(
    const int8_t* A, int64_t lda, const int8_t* packed, const int32_t* shifted_sums, const float* row_scales,
    const float* column_scales, int64_t K, int64_t k_blocks, int64_t nb0, int64_t N, bool accumulate, float* C,
    int64_t ldc) {
  __m512i sums[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) sums[r][j] = _mm512_setzero_si512();
  const __m512i to_unsigned = _mm512_set1_epi32(int32_t(0x80808080u));
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const int8_t* tiles[NR];
    for (int j = 0; j < NR; ++j) tiles[j] = packed + ((nb0 + j) * k_blocks + kb) * kTileBytes;
    const int8_t* a = A + kb * kDepth;
    const int groups = int(std::min<int64_t>(kDepth, K - kb * kDepth) + 3) / 4;
    for (int group = 0; group < groups; ++group) {
      __m512i b[NR];
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_si512(tiles[j] + group * 64);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int32_t four;
        __builtin_memcpy(&four, a + r * lda + group * 4, 4);
        const __m512i row = _mm512_xor_si512(_mm512_set1_epi32(four), to_unsigned);
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) sums[r][j] = _mm512_dpbusd_epi32(sums[r][j], row, b[j]);
      }
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t n = (nb0 + j) * kColumns;
    const __mmask16 valid = N - n >= kColumns ? __mmask16(0xffff) : __mmask16((1u << (N - n)) - 1);
    const __m512i shift = _mm512_loadu_si512(shifted_sums + n);
    const __m512 scales = _mm512_maskz_loadu_ps(valid, column_scales + n);
    for (int r = 0; r < MR; ++r) {
      const __m512 value = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r][j], shift)),
                                         _mm512_mul_ps(_mm512_set1_ps(row_scales[r]), scales));
      float* out = C + r * ldc + n;
      _mm512_mask_storeu_ps(out, valid, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(valid, out), value) : value);
    }
  }
}

bool vnni_available() { return __builtin_cpu_supports("avx512vnni"); }

#endif  // LSTM_VNNI

}  // namespace

float quantize_row(const float* x, int64_t n, int8_t* q) {
  float largest = 0.0f;
  bool nan = false;
  int64_t j = 0;
#ifdef __AVX512F__
  // (a max reduction GCC does not vectorise without -ffast-math: NaN makes it order-dependent)
  __m512 running = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    running = _mm512_max_ps(running, _mm512_abs_ps(v));
  }
  largest = _mm512_reduce_max_ps(running);
  nan = unordered != 0;
#endif
  for (; j < n; ++j) {
    largest = std::max(largest, std::fabs(x[j]));
    nan |= x[j] != x[j];
  }
  if (nan) largest = NAN;
  const float inverse = largest > 0.0f && largest < INFINITY ? 127.0f / largest : 0.0f;
  j = 0;
#ifdef __AVX512F__
  const __m512 step = _mm512_set1_ps(inverse);
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
  for (; inverse != 0.0f && j + 16 <= n; j += 16) {
    // (the conversion rounds half to even: the default rounding mode, as nearbyint below)
    const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), step));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                     _mm512_cvtepi32_epi8(_mm512_min_epi32(high, _mm512_max_epi32(low, rounded))));
  }
#endif
  for (; j < n; ++j) {
    const float v = inverse == 0.0f ? 0.0f : std::nearbyint(x[j] * inverse);
    q[j] = int8_t(std::min(127.0f, std::max(-127.0f, v)));
  }
  return largest / 127.0f;
}

void Int8Right::pack(const int8_t* B, int64_t K, int64_t N, int8_t* packed) {
  const int64_t k_blocks = padded_depth(K) / kDepth, n_blocks = (N + kColumns - 1) / kColumns;
  std::fill(packed, packed + packed_bytes(K, N), int8_t(0));
  int32_t* shifted_sums = reinterpret_cast<int32_t*>(packed + padded_depth(K) * padded_columns(N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) shifted_sums[n] += 128 * int32_t(B[k * N + n]);
  for (int64_t nb = 0; nb < n_blocks; ++nb)
    for (int64_t k = 0; k < K; ++k) {
      int8_t* tile = packed + (nb * k_blocks + k / kDepth) * kTileBytes;
      const int64_t group = (k % kDepth) / 4, lane = k % 4;
      for (int64_t n = nb * kColumns; n < std::min(N, (nb + 1) * kColumns); ++n)
        tile[group * 64 + 4 * (n % kColumns) + lane] = B[k * N + n];
    }
}

Int8Right::Int8Right(const int8_t* packed, const float* column_scales, int64_t K, int64_t N)
    : packed_(packed), shifted_sums_(reinterpret_cast<const int32_t*>(packed + padded_depth(K) * padded_columns(N))),
      column_scales_(column_scales), K_(K), N_(N), k_blocks_(padded_depth(K) / kDepth),
      n_blocks_((N + kColumns - 1) / kColumns), tiles_(amx::usable<amx::kInt8>()),
#ifdef LSTM_VNNI
      vnni_(vnni_available()) {
}
#else
      vnni_(false) {
}
#endif

void Int8Right::vnni_mm(int64_t rows, const int8_t* A, int64_t lda, const float* row_scales, bool accumulate,
                        float* C, int64_t ldc) const {
#ifdef LSTM_VNNI
  // (a macro: the block's sizes are template arguments)
#define LSTM_VNNI_BLOCK(MR, NR) \
  vnni_block<MR, NR>(A + m * lda, lda, packed_, shifted_sums_, row_scales + m, column_scales_, K_, k_blocks_, nb, N_, \
                     accumulate, C + m * ldc, ldc)
  for (int64_t nb = 0; nb < n_blocks_; nb += 4) {
    const int64_t NR = std::min<int64_t>(4, n_blocks_ - nb);
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) {
      if (NR == 4) LSTM_VNNI_BLOCK(4, 4);
      else if (NR == 3) LSTM_VNNI_BLOCK(4, 3);
      else if (NR == 2) LSTM_VNNI_BLOCK(4, 2);
      else LSTM_VNNI_BLOCK(4, 1);
    }
    for (; m < rows; ++m) {
      if (NR == 4) LSTM_VNNI_BLOCK(1, 4);
      else if (NR == 3) LSTM_VNNI_BLOCK(1, 3);
      else if (NR == 2) LSTM_VNNI_BLOCK(1, 2);
      else LSTM_VNNI_BLOCK(1, 1);
    }
  }
#undef LSTM_VNNI_BLOCK
#endif
}

void Int8Right::mm(int64_t rows, const int8_t* A, int64_t lda, const float* row_scales, bool accumulate, float* C,
                   int64_t ldc) const {
  if (rows == 0 || N_ == 0) return;
  alignas(64) int32_t sums[4 * kRows * kColumns];
#ifdef LSTM_AMX
  if (tiles_) {
    amx::configure_tiles();
    for (int64_t nb = 0; nb < n_blocks_; nb += 2) {
      const int64_t n0 = nb * kColumns;
      const bool two_n = nb + 1 < n_blocks_;
      const int8_t* B0 = packed_ + nb * k_blocks_ * kTileBytes;
      const int8_t* B1 = B0 + k_blocks_ * kTileBytes;
      for (int64_t m0 = 0; m0 < rows; m0 += 2 * kRows) {
        const bool two_m = m0 + kRows < rows;
        const int8_t* Ab = A + m0 * lda;
        if (two_m && two_n) tile_sums<2, 2>(Ab, lda, B0, B1, k_blocks_, sums);
        else if (two_m) tile_sums<2, 1>(Ab, lda, B0, B1, k_blocks_, sums);
        else if (two_n) tile_sums<1, 2>(Ab, lda, B0, B1, k_blocks_, sums);
        else tile_sums<1, 1>(Ab, lda, B0, B1, k_blocks_, sums);
        const int NT = two_n ? 2 : 1;
        for (int i = 0; i < (two_m ? 2 : 1); ++i)
          for (int j = 0; j < NT; ++j) {
            const int64_t m = m0 + i * kRows, n = n0 + j * kColumns;
            scale_into(sums + (i * NT + j) * kRows * kColumns, row_scales + m, column_scales_ + n, accumulate,
                       C + m * ldc + n, ldc, std::min(kRows, rows - m), std::min(kColumns, N_ - n));
          }
      }
    }
    amx::release_tiles();
    return;
  }
#endif
  if (vnni_) return vnni_mm(rows, A, lda, row_scales, accumulate, C, ldc);
  for (int64_t nb = 0; nb < n_blocks_; ++nb) {
    const int64_t n = nb * kColumns;
    for (int64_t m = 0; m < rows; ++m) {
      int32_t* row = sums;
      std::fill(row, row + kColumns, 0);
      for (int64_t kb = 0; kb < k_blocks_; ++kb) {
        const int8_t* tile = packed_ + (nb * k_blocks_ + kb) * kTileBytes;
        const int8_t* a = A + m * lda + kb * kDepth;
        for (int64_t k = 0; k < std::min(kDepth, K_ - kb * kDepth); ++k) {
          const int32_t value = a[k];
          const int8_t* b = tile + (k / 4) * 64 + k % 4;
          for (int64_t j = 0; j < kColumns; ++j) row[j] += value * b[4 * j];
        }
      }
      scale_into(row, row_scales + m, column_scales_ + n, accumulate, C + m * ldc + n, ldc, 1,
                 std::min(kColumns, N_ - n));
    }
  }
}

}  // namespace lstm_core
