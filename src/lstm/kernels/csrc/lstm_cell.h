// The LSTM cell's gate math for one batch row, shared by the sequence loops (lstm.cpp) and the
// one-step routes (streaming.cpp): inline, so each loop keeps it in its own body.
#pragma once

#include <cstdint>

#include "simd.h"

namespace lstm_core {

// z [4U] the pre-activations i|f|c|o in, activated in place; writes c_new and h.
template <typename T>
inline void gate_row(T* __restrict__ z, const T* __restrict__ cp, T* __restrict__ c_new, T* __restrict__ h,
                     int64_t U, int act, int ract) {
  if (act == ract) {
    act_inplace(act, z, 4 * U);
  } else {
    act_inplace(ract, z, 2 * U);
    act_inplace(act, z + 2 * U, U);
    act_inplace(ract, z + 3 * U, U);
  }
  const T* i = z;
  const T* f = z + U;
  const T* g = z + 2 * U;
  const T* o = z + 3 * U;
  for (int64_t j = 0; j < U; ++j) {
    T c = f[j] * cp[j] + i[j] * g[j];
    c_new[j] = c;
    h[j] = c;
  }
  act_inplace(act, h, U);
  for (int64_t j = 0; j < U; ++j) h[j] *= o[j];
}

}  // namespace lstm_core
