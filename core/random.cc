#include "core/random.h"

#include <cmath>
#include <vector>

#include "core/philox.h"
#include "core/status.h"
#include "core/tensor_cuda.h"

namespace lc {

std::array<uint32_t, 4> Philox(uint64_t key, uint64_t counter_hi,
                               uint64_t counter_lo) {
  const PhiloxBlock block = PhiloxAt(key, counter_hi, counter_lo);
  return {block.word[0], block.word[1], block.word[2], block.word[3]};
}

namespace {

// 24 random bits scaled to [0, 1): exactly representable in float.
constexpr double kTwoPow24Inv = 1.0 / 16777216.0;

}  // namespace

float UniformAt(uint64_t seed, uint64_t offset, uint64_t i) {
  return PhiloxUniform(seed, offset, i);
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

void CheckDraw(const char* what, const Shape& shape, DType dtype) {
  LC_REQUIRE(IsFloating(dtype), what, ": dtype ", DTypeName(dtype),
             " (expected float32, float64 or bfloat16)");
  for (int64_t s : shape) {
    LC_REQUIRE(s >= 0, what, ": negative size in shape ", ShapeToString(shape),
               " (expected sizes >= 0)");
  }
}

// Draws on the CPU (and copies to `device`).
template <typename Sample>
Tensor Draw(const char* what, const Shape& shape, Generator& gen, DType dtype,
            Device device, Sample sample) {
  CheckDraw(what, shape, dtype);
  const uint64_t offset = gen.NextOffset();
  std::vector<double> values(NumElements(shape));
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = sample(gen.seed(), offset, i);
  }
  return FromVector(values, shape, dtype, device);
}

}  // namespace

// On CUDA the uniform draw runs on the device: PhiloxUniform is exact
// integer and power-of-two arithmetic, so the elements equal the CPU's bit
// for bit.
Tensor Rand(const Shape& shape, Generator& gen, DType dtype, Device device) {
  if (device.is_cpu()) {
    return Draw("Rand", shape, gen, dtype, device, UniformAt);
  }
  CheckDraw("Rand", shape, dtype);
  Tensor out = Empty(shape, dtype, device);
  UniformCuda(device.index, out.raw_data(), dtype, out.numel(), gen.seed(),
              gen.NextOffset());
  return out;
}

// Normal draws stay on the CPU for every device: Box-Muller's log and cos
// differ in the last ulp between libm and CUDA's math library, and a CUDA
// Randn must equal the CPU's (tests and multi-device runs draw the same
// initial weights). Randn is used for initialization, not in hot loops.
Tensor Randn(const Shape& shape, Generator& gen, DType dtype, Device device) {
  return Draw("Randn", shape, gen, dtype, device, NormalAt);
}

}  // namespace lc
