// operand_gemm (low_precision.h): MKL's low-precision GEMM where the CPU has the type's
// instructions, else float32's products of the widened operands. Without the instructions MKL
// widens both operands at every call and multiplies them with its float32 code (on an AMD EPYC
// with AVX2 only, 2 threads, mixed_bfloat16's training step at (32,80,100,64) over float32's,
// MKL -> widened here: LSTM 1.19-1.25 -> 1.11-1.14, GRU 1.28-1.35 -> 1.20-1.22, SimpleRNN
// 1.38-1.42 -> 1.18).
#include "low_precision.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "buffer_pool.h"
#include "gemm.h"

namespace lstm_core {

extern "C" {
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int) __attribute__((weak));
void cblas_gemm_f16f16f32(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                          float*, int) __attribute__((weak));
}

namespace {

int low_products_setting = -1;  // set_low_products

// rows of A widened at a time on the panels' route: a chunk stays in L1 or L2 while every panel takes it
constexpr int64_t kWidenedRows = 48;
// elements widened per task of a parallel widening
constexpr int64_t kWidenGrain = 1 << 15;

// in [n] (the operand type's bits) -> out [n] in float32, exactly; a loop that vectorises
void widen(Operand op, const uint16_t* in, float* out, int64_t n) {
  if (op == Operand::bf16) {
    for (int64_t j = 0; j < n; ++j) out[j] = from_bf16(in[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = from_f16(in[j]);
  }
}

// X [rows, columns] (ld its row stride) widened into a new contiguous float32 tensor, the rows spread
// over the threads
at::Tensor widened(Operand op, const uint16_t* X, int64_t rows, int64_t columns, int64_t ld) {
  auto out = buffer_pool::empty({rows, columns}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kWidenGrain / std::max<int64_t>(1, columns)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) widen(op, X + r * ld, o + r * columns, columns);
                   });
  return out;
}

// op(B) [K, N] widened, row-major (B stored [N, K] where transposed: a weight, small)
std::vector<float> widened_right(Operand op, int64_t N, int64_t K, const uint16_t* B, int64_t ldb, bool trans_b) {
  std::vector<float> b(K * N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[k * N + n] = from_operand(op, trans_b ? B[n * ldb + k] : B[k * ldb + n]);
  return b;
}

void widened_gemm(Operand op, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                  int64_t ldb, float beta, float* C, int64_t ldc, bool trans_a, bool trans_b) {
  const bool accumulate = beta != 0.0f;
  if (!trans_a && panels_preferred() && K > 0) {
    // A's rows widened a chunk at a time, each chunk's product on the panels, the chunks over the threads
    const std::vector<float> b = widened_right(op, N, K, B, ldb, trans_b);
    const PanelRight right(N, K, b.data(), N);
    const int64_t chunks = (M + kWidenedRows - 1) / kWidenedRows;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> rows(kWidenedRows * K);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t m0 = c * kWidenedRows, count = std::min(kWidenedRows, M - m0);
        for (int64_t m = 0; m < count; ++m) widen(op, A + (m0 + m) * lda, rows.data() + m * K, K);
        right.mm(count, rows.data(), K, accumulate, C + m0 * ldc, ldc);
      }
    });
    return;
  }
  // both widened in their stored layouts, then float32's GEMM (column-major: C^T = op(B)^T op(A)^T)
  const at::Tensor a = widened(op, A, trans_a ? K : M, trans_a ? M : K, lda);
  const at::Tensor b = widened(op, B, trans_b ? N : K, trans_b ? K : N, ldb);
  const auto as_matrix = [](const at::Tensor& t, bool trans) { return trans ? t.t() : t; };
  if (K == 0 || !have_blas()) {
    auto c = at::from_blob(C, {M, N}, {ldc, 1}, a.options());
    if (!accumulate) c.zero_();
    if (K > 0) c.addmm_(as_matrix(a, trans_a), as_matrix(b, trans_b));
    return;
  }
  blas_gemm<float>(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', int(N), int(M), int(K), 1.0f, b.data_ptr<float>(),
                   int(b.size(1)), a.data_ptr<float>(), int(a.size(1)), beta, C, int(ldc));
}

}  // namespace

bool operand_in_hardware(Operand op) {
  if (low_products_setting >= 0) return low_products_setting > 0;
#if defined(__x86_64__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16"), f16 = __builtin_cpu_supports("avx512fp16");
  return op == Operand::bf16 ? bf16 : f16;
#else
  return false;
#endif
}

int set_low_products(int mode) { return std::exchange(low_products_setting, mode); }

void operand_gemm(Operand op, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                  int64_t ldb, float beta, float* C, int64_t ldc, bool trans_a, bool trans_b) {
  if (M == 0 || N == 0) return;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  auto* mkl = op == Operand::bf16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  if (mkl != nullptr && K > 0 && operand_in_hardware(op)) {
    mkl(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(M), int(N), int(K), 1.0f, A,
        int(lda), B, int(ldb), beta, C, int(ldc));
    return;
  }
  widened_gemm(op, M, N, K, A, lda, B, ldb, beta, C, ldc, trans_a, trans_b);
}

}  // namespace lstm_core
