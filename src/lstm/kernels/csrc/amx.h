// AMX (Sapphire Rapids and later), shared by the tile kernels (operand_right.cpp: bfloat16,
// int8_product.cpp: int8): eight tile registers of 16 rows x 64 bytes, asked for once from the OS.
// Compiled only into the x86-64-v4 module (every CPU with AMX has AVX-512), on Linux, which hands
// the tiles out; elsewhere LSTM_AMX is undefined and the kernels take their other routes.
#pragma once

namespace lstm_core::amx {
constexpr int kBf16 = 22, kInt8 = 25;  // the CPUID.(7,0).EDX bits of the tiles' bf16 and int8 instructions
}  // namespace lstm_core::amx

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__linux__)
#define LSTM_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace lstm_core::amx {

// The CPU has AMX tiles with the instructions of CPUID.(7,0).EDX bit `feature` (22: bf16, 25: int8)
// and the OS lets this process use them (Linux gives a process the tiles' state only when asked:
// arch_prctl ARCH_REQ_XCOMP_PERM, 5.16+)
inline bool request(int feature) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), instructions = d & (1u << feature);
  if (!tile || !instructions) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}


struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// tiles 0-7 all 16 rows x 64 bytes (a constant in memory: GCC drops a local's stores before
// LDTILECFG, which it does not see reading them)
constexpr TileConfig sixteen_row_tiles() {
  TileConfig config{1, 0, {}, {}, {}};
  for (int tile = 0; tile < 8; ++tile) {
    config.bytes_per_row[tile] = 64;
    config.rows[tile] = 16;
  }
  return config;
}
inline constexpr TileConfig kSixteenRowTiles = sixteen_row_tiles();

__attribute__((target("amx-tile"))) inline void configure_tiles() { _tile_loadconfig(&kSixteenRowTiles); }

__attribute__((target("amx-tile"))) inline void release_tiles() { _tile_release(); }

// (the tile instructions are asm statements without a memory clobber: this orders them with the
// loads and stores around them)
inline void memory_barrier() { asm volatile("" ::: "memory"); }

}  // namespace lstm_core::amx

#endif

namespace lstm_core::amx {

// The CPU has the tiles with the instructions of `Feature` (kBf16, kInt8) and the OS lets this
// process use them (asked once per kind); false where this module has no tile code
template <int Feature>
bool usable() {
#ifdef LSTM_AMX
  static const bool granted = request(Feature);
  return granted;
#else
  return false;
#endif
}

}  // namespace lstm_core::amx
