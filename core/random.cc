#include "core/random.h"

#include <cmath>
#include <vector>

#include "core/status.h"

namespace lc {

std::array<uint32_t, 4> Philox(uint64_t key, uint64_t counter_hi,
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
  return {c[0], c[1], c[2], c[3]};
}

namespace {

// 24 random bits scaled to [0, 1): exactly representable in float.
constexpr double kTwoPow24Inv = 1.0 / 16777216.0;

}  // namespace

float UniformAt(uint64_t seed, uint64_t offset, uint64_t i) {
  return static_cast<float>((Philox(seed, offset, i)[0] >> 8) * kTwoPow24Inv);
}

float NormalAt(uint64_t seed, uint64_t offset, uint64_t i) {
  const std::array<uint32_t, 4> words = Philox(seed, offset, i);
  // u1 in (0, 1] keeps the log finite.
  const double u1 = ((words[0] >> 8) + 1) * kTwoPow24Inv;
  const double u2 = (words[1] >> 8) * kTwoPow24Inv;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) *
                            std::cos(2.0 * M_PI * u2));
}

Generator& DefaultGenerator() {
  thread_local Generator generator(0);
  return generator;
}

namespace {

template <typename Sample>
Tensor Draw(const char* what, const Shape& shape, Generator& gen, DType dtype,
            Device device, Sample sample) {
  LC_REQUIRE(IsFloating(dtype), what, ": dtype ", DTypeName(dtype),
             " (expected float32, float64 or bfloat16)");
  for (int64_t s : shape) {
    LC_REQUIRE(s >= 0, what, ": negative size in shape ", ShapeToString(shape),
               " (expected sizes >= 0)");
  }
  const uint64_t offset = gen.NextOffset();
  std::vector<double> values(NumElements(shape));
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = sample(gen.seed(), offset, i);
  }
  return FromVector(values, shape, dtype, device);
}

}  // namespace

Tensor Rand(const Shape& shape, Generator& gen, DType dtype, Device device) {
  return Draw("Rand", shape, gen, dtype, device, UniformAt);
}

Tensor Randn(const Shape& shape, Generator& gen, DType dtype, Device device) {
  return Draw("Randn", shape, gen, dtype, device, NormalAt);
}

}  // namespace lc
