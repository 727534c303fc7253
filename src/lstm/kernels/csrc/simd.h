// Element-wise maths of the kernel core: exp, the activations by code and their derivatives
// (from the activated values), software prefetch. Activation codes (native.ACTIVATION_CODES):
// tanh 0, sigmoid 1, relu 2, linear 3, hard_sigmoid 4 (x/6+1/2 clipped), hard_sigmoid_tf_keras 5
// (0.2x+1/2 clipped). With AVX-512 (a build for it) sigmoid and tanh run 16 lanes at a time; every
// other build takes the portable loops, written for the compiler's auto-vectoriser.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lstm_core {

// ----- fast, accurate exp (Cody-Waite + Taylor), written for gcc's auto-vectoriser -------------
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  float k = std::nearbyint(x * 1.44269504088896341f);
  float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return p * s;
}

inline double exp_fast(double x) {
  x = std::min(std::max(x, -708.0), 708.0);
  double k = std::nearbyint(x * 1.4426950408889634);
  double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  double p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
      1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800 + r * (
      1.0 / 39916800 + r * (1.0 / 479001600))))))))))));
  int64_t bits = (static_cast<int64_t>(k) + 1023) << 52;
  double s;
  std::memcpy(&s, &bits, sizeof(s));
  return p * s;
}

#ifdef __AVX512F__
// float32 sigmoid / tanh, 16 lanes: the same exp (2^k applied with scalef) and a reciprocal
// from rcp14 plus one Newton step (relative error ~1e-8) instead of a division.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

inline __m512 recip512(__m512 d) {
  __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// returns the number of elements done (a multiple of 16); the caller finishes the tail
inline int64_t act512(int code, float* z, int64_t n) {
  int64_t j = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  if (code == 0) {
    for (; j + 16 <= n; j += 16) {
      __m512 e = exp512(_mm512_add_ps(_mm512_loadu_ps(z + j), _mm512_loadu_ps(z + j)));
      __m512 r = recip512(_mm512_add_ps(e, one));
      _mm512_storeu_ps(z + j, _mm512_fnmadd_ps(_mm512_set1_ps(2.0f), r, one));
    }
  } else if (code == 1) {
    for (; j + 16 <= n; j += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(z + j)));
      _mm512_storeu_ps(z + j, recip512(_mm512_add_ps(e, one)));
    }
  }
  return j;
}
#endif

template <typename T>
inline void act_inplace(int code, T* __restrict__ z, int64_t n) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (code <= 1) {
      int64_t done = act512(code, z, n);
      z += done;
      n -= done;
    }
  }
#endif
  switch (code) {
    case 0:
      for (int64_t j = 0; j < n; ++j) z[j] = T(1) - T(2) / (exp_fast(T(2) * z[j]) + T(1));
      break;
    case 1:
      for (int64_t j = 0; j < n; ++j) z[j] = T(1) / (T(1) + exp_fast(-z[j]));
      break;
    case 2:
      for (int64_t j = 0; j < n; ++j) { T v = z[j]; z[j] = (v > T(0) || v != v) ? v : T(0); }
      break;
    case 4:
      for (int64_t j = 0; j < n; ++j) z[j] = std::min(std::max(z[j] / T(6) + T(0.5), T(0)), T(1));
      break;
    case 5:
      for (int64_t j = 0; j < n; ++j) z[j] = std::min(std::max(T(0.2) * z[j] + T(0.5), T(0)), T(1));
      break;
    default:
      break;  // linear
  }
}

template <typename T>
inline T dact(int code, T y) {
  switch (code) {
    case 0: return T(1) - y * y;
    case 1: return y * (T(1) - y);
    case 2: return y > T(0) ? T(1) : T(0);
    case 3: return T(1);
    case 4: return (y > T(0) && y < T(1)) ? T(1) / T(6) : T(0);
    default: return (y > T(0) && y < T(1)) ? T(0.2) : T(0);
  }
}

// derivative arrays, vectorisable for the common codes
template <typename T>
inline void dact_arr(int code, const T* __restrict__ y, T* __restrict__ d, int64_t n) {
  if (code == 0) {
    for (int64_t j = 0; j < n; ++j) d[j] = T(1) - y[j] * y[j];
  } else if (code == 1) {
    for (int64_t j = 0; j < n; ++j) d[j] = y[j] * (T(1) - y[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) d[j] = dact(code, y[j]);
  }
}

// Software prefetch of the rows the next step reads or writes. Each step touches one row per batch
// row of every [B, T, *] buffer, T rows apart: as many short streams as rows times buffers, more
// than the hardware prefetchers follow, so without it the loops wait on memory (measured at
// (32,80,100,64), 1 thread: the layer-norm variant's forward+backward 11.4 -> 9.0 M cycles, the
// cell-clip variant's 8.3 -> 7.4 M; no change where the GEMMs dominate, e.g. (256,50,64,512)).
template <typename T>
inline void prefetch_read(const T* p, int64_t n) {
  for (int64_t j = 0; j < n; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + j, 0, 3);
}
template <typename T>
inline void prefetch_write(T* p, int64_t n) {
  for (int64_t j = 0; j < n; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + j, 1, 3);
}


}  // namespace lstm_core
