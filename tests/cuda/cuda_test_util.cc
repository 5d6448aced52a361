#include "tests/cuda/cuda_test_util.h"

#include <cmath>
#include <cstdlib>

#include "core/cuda.h"

namespace lc {

void CudaTest::SetUp() {
  if (CudaDeviceCount() > 0) return;
  const char* required = std::getenv("LC_REQUIRE_GPU");
  if (required != nullptr && std::string(required) == "1") {
    FAIL() << "LC_REQUIRE_GPU=1 but no CUDA device is visible";
  }
  GTEST_SKIP() << "no CUDA device";
}

double CudaRelativeTolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
      return 1e-10;
    case DType::kFloat32:
      return 1e-5;
    default:
      return 2e-2;
  }
}

Tensor RandomNormal(const Shape& shape, DType dtype, Device device,
                    uint64_t seed) {
  Generator gen(seed);
  return Randn(shape, gen, DType::kFloat64).to(dtype).to(device);
}

void ExpectCudaClose(const Tensor& actual, const Tensor& expected, double rtol,
                     const std::string& what, double atol) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  const std::vector<double> a = actual.to(Device::Cpu()).ToVector();
  const std::vector<double> e = expected.to(Device::Cpu()).ToVector();
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(e[i])) {
      ASSERT_EQ(a[i], e[i]) << what << ": element " << i;
      continue;
    }
    ASSERT_TRUE(std::isfinite(a[i]))
        << what << ": element " << i << " is " << a[i] << ", expected " << e[i];
    diff += (a[i] - e[i]) * (a[i] - e[i]);
    norm += e[i] * e[i];
  }
  EXPECT_LE(std::sqrt(diff), rtol * std::sqrt(norm) + atol)
      << what << ": relative error " << std::sqrt(diff) / std::sqrt(norm)
      << " over " << a.size() << " elements (rtol " << rtol << ")";
}

uint64_t SeedOfCase(const std::string& name) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (char c : name) {
    hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  }
  return hash;
}

void ExpectLeavesMatchCpu(
    const std::string& what,
    const std::function<Tensor(const std::vector<Tensor>&)>& op,
    const std::vector<Shape>& shapes, DType dtype, double tol) {
  SCOPED_TRACE(what);
  std::vector<Tensor> inputs, refs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const uint64_t seed = SeedOfCase(what + " input " + std::to_string(i));
    inputs.push_back(RandomNormal(shapes[i], dtype, Device::Cuda(0), seed)
                         .set_requires_grad(true));
    refs.push_back(inputs.back()
                       .detach()
                       .to(Device::Cpu())
                       .to(DType::kFloat64)
                       .set_requires_grad(true));
  }
  const Tensor y = op(inputs);
  const Tensor y_ref = op(refs);
  ASSERT_TRUE(y.device() == Device::Cuda(0)) << y.device();
  ASSERT_EQ(y.dtype(), dtype);
  ExpectCudaClose(y, y_ref, tol, what + " forward");
  const Tensor g = RandomNormal(y.shape(), dtype, Device::Cuda(0),
                                SeedOfCase(what + " gradient"));
  y.backward(g);
  y_ref.backward(g.to(Device::Cpu()).to(DType::kFloat64));
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_TRUE(inputs[i].grad().defined()) << "input " << i;
    EXPECT_EQ(inputs[i].grad().dtype(), dtype);
    ExpectCudaClose(inputs[i].grad(), refs[i].grad(), tol,
                    what + " gradient of input " + std::to_string(i));
  }
}

}  // namespace lc
