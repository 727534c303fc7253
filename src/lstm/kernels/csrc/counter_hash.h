// Counter-based random bits (splitmix64), for draws that need no state and no memory: zoneout's
// keep flags (lstm.cpp) and dropout's keep-masks (bindings/keep_masks.cpp); problem.py computes the
// same numbers with torch ops.
#pragma once

#include <cstdint>

namespace lstm_core {

constexpr int kUniformBits = 24;  // a draw's resolution: thresholds are rate * 2^24

// The top 24 bits of splitmix64(seed + (n + 1) * golden): counter n's uniform draw in [0, 2^24)
inline uint64_t counter_bits(uint64_t seed, uint64_t n) {
  uint64_t z = seed + (n + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z >> (64 - kUniformBits);
}

}  // namespace lstm_core
