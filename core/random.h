// Counter-based random numbers (Philox-4x32-10): the value of element i of a
// draw depends only on (seed, offset, i), so a CUDA kernel and a CPU loop
// produce the same stream, in any order, on any number of threads.
#ifndef LONGCTX_CORE_RANDOM_H_
#define LONGCTX_CORE_RANDOM_H_

#include <array>
#include <cstdint>

#include "core/tensor.h"

namespace lc {

// One Philox-4x32-10 block: four 32-bit words for (key, counter).
std::array<uint32_t, 4> Philox(uint64_t key, uint64_t counter_hi,
                               uint64_t counter_lo);

// Element i of a draw that started at `offset` under `seed`:
//   uniform in [0, 1) with 24 random bits: Philox(seed, offset, i)[0];
//   standard normal by Box-Muller from words 0 and 1 of the same block.
float UniformAt(uint64_t seed, uint64_t offset, uint64_t i);
float NormalAt(uint64_t seed, uint64_t offset, uint64_t i);

// A seed and a position in its stream. Each draw of n elements uses offsets
// [offset, offset + 1) and advances offset by 1, whatever n is: a draw is
// one Philox counter_hi value and its elements are counter_lo = 0..n-1.
class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}

  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_offset(uint64_t offset) { offset_ = offset; }
  // Returns the offset for a new draw and advances the stream.
  uint64_t NextOffset() { return offset_++; }

 private:
  uint64_t seed_;
  uint64_t offset_ = 0;
};

// This thread's generator, used where no generator is given (dropout). Seed
// it with DefaultGenerator() = Generator(seed).
Generator& DefaultGenerator();

// Tensors of independent draws.
Tensor Rand(const Shape& shape, Generator& gen, DType dtype = DType::kFloat32,
            Device device = Device::Cpu());
Tensor Randn(const Shape& shape, Generator& gen, DType dtype = DType::kFloat32,
             Device device = Device::Cpu());

}  // namespace lc

#endif  // LONGCTX_CORE_RANDOM_H_
