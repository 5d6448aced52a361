// Philox-4x32-10, the counter-based generator behind core/random.h, as inline
// functions that compile for the host and for CUDA devices alike: a kernel
// and a CPU loop that ask for (seed, offset, i) get the same bits.
#ifndef LONGCTX_CORE_PHILOX_H_
#define LONGCTX_CORE_PHILOX_H_

#include <cstdint>

#if defined(__CUDACC__)
#define LC_HOST_DEVICE __host__ __device__
#else
#define LC_HOST_DEVICE
#endif

namespace lc {

struct PhiloxBlock {
  uint32_t word[4];
};

// One Philox-4x32-10 block: four 32-bit words for (key, counter).
LC_HOST_DEVICE inline PhiloxBlock PhiloxAt(uint64_t key, uint64_t counter_hi,
                                           uint64_t counter_lo) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c[4] = {static_cast<uint32_t>(counter_lo),
                   static_cast<uint32_t>(counter_lo >> 32),
                   static_cast<uint32_t>(counter_hi),
                   static_cast<uint32_t>(counter_hi >> 32)};
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1);
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return PhiloxBlock{{c[0], c[1], c[2], c[3]}};
}

// Element i of a uniform draw that started at `offset` under `seed`: 24
// random bits of word 0 scaled to [0, 1), exactly representable in float, so
// the host and the device agree bit for bit.
LC_HOST_DEVICE inline float PhiloxUniform(uint64_t seed, uint64_t offset,
                                          uint64_t i) {
  return static_cast<float>(PhiloxAt(seed, offset, i).word[0] >> 8) *
         (1.0f / 16777216.0f);
}

// Attention dropout's draws: n, the number of streams and the generator
// offset of a call must each be at most kAttentionDropoutLimit (the offset
// below it) for every pair to get its own counter (AttentionDropoutUniform).
constexpr uint64_t kAttentionDropoutLimit = uint64_t{1} << 32;

// The attention-dropout draw of pair (query t, key u) in `stream` (one per
// batch, head and pattern) of a call over n tokens that drew `offset` under
// `seed`. The 128-bit counter holds the stream in its top 32 bits, the
// offset in the next 32 and t * n + u in the low 64, so pairs, streams and
// calls never share a counter while n <= 2^32 and stream, offset < 2^32
// (callers check kAttentionDropoutLimit); stream 0 is element t * n + u of
// a plain draw at `offset`. The CPU primitive, the CUDA kernels and the
// reference all draw through this one function.
LC_HOST_DEVICE inline float AttentionDropoutUniform(uint64_t seed,
                                                    uint64_t offset,
                                                    uint64_t stream, uint64_t n,
                                                    uint64_t t, uint64_t u) {
  return PhiloxUniform(seed, (stream << 32) | offset, t * n + u);
}

}  // namespace lc

#endif  // LONGCTX_CORE_PHILOX_H_
