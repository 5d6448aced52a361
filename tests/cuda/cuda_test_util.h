// Shared by the GPU suites (//tests:cuda_test): a fixture that skips a test
// when no CUDA device is present (and fails instead under LC_REQUIRE_GPU=1,
// which device runs set), random inputs, and the comparison of a CUDA result
// with a CPU float64 reference. The GPU suites do not link libtorch: the CPU
// ops they compare against are themselves checked against libtorch.
#ifndef LONGCTX_TESTS_CUDA_CUDA_TEST_UTIL_H_
#define LONGCTX_TESTS_CUDA_CUDA_TEST_UTIL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/random.h"
#include "core/tensor.h"
#include "gtest/gtest.h"

namespace lc {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override;
};

// Relative tolerance of a CUDA result in `dtype` against a float64 reference,
// by the rounding of the dtype the kernel stores and accumulates in:
// float64 1e-10 (reassociation only), float32 1e-5 (about 2^-17 relative
// error accumulated over reductions of a few thousand terms), bfloat16 2e-2
// (8-bit mantissa: 2^-8 = 3.9e-3 per rounding, a few roundings per result).
double CudaRelativeTolerance(DType dtype);

// Fresh standard-normal values of `shape` in `dtype` on `device`, drawn from
// a seed that differs per call (fresh inputs) but is printed on failure by
// ExpectCudaClose through the test's trace.
Tensor RandomNormal(const Shape& shape, DType dtype, Device device,
                    uint64_t seed);

// Expects ||actual - expected|| <= rtol * ||expected|| + atol (norms over all
// elements, actual copied to the CPU in float64) and every element finite
// where expected is finite. `what` names the quantity in the failure.
void ExpectCudaClose(const Tensor& actual, const Tensor& expected, double rtol,
                     const std::string& what, double atol = 0);

// A stable seed per test case (FNV-1a of its name): every case gets fresh
// inputs, and a failing case reruns on the same ones.
uint64_t SeedOfCase(const std::string& name);

// The floating dtypes every op is checked in.
inline constexpr DType kFloatingDTypes[] = {DType::kFloat64, DType::kFloat32,
                                            DType::kBFloat16};

// Runs op on CUDA leaves (standard normal values of `shapes` in `dtype`,
// seeded by `what`) and on float64 CPU copies of them, expects the outputs to
// agree within relative tolerance `tol`, then backpropagates one random
// gradient through both and expects every leaf's gradient to agree within
// `tol`. op applies any views (transposes, slices) to its inputs itself, so
// strided operands get their gradients through the views, and picks any index
// tensors it takes for its inputs' device.
void ExpectLeavesMatchCpu(
    const std::string& what,
    const std::function<Tensor(const std::vector<Tensor>&)>& op,
    const std::vector<Shape>& shapes, DType dtype, double tol);

}  // namespace lc

#endif  // LONGCTX_TESTS_CUDA_CUDA_TEST_UTIL_H_
