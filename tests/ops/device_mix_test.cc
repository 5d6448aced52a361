// Ops given one CPU and one CUDA tensor throw an lc::Error naming both
// devices, from their input checks before any kernel runs. No GPU is needed:
// the CUDA tensors live in host memory (ScopedHostCudaAllocator) and are
// never touched by a kernel.
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/shape_ops.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::lc::testing::ExpectError;
using ::lc::testing::ScopedHostCudaAllocator;

TEST(DeviceMixTest, CpuAndCudaInputsAreAClearError) {
  ScopedHostCudaAllocator host_cuda;
  const Tensor cpu = Zeros({3, 3});
  const Tensor cuda = Empty({3, 3}, DType::kFloat32, Device::Cuda(0));
  ASSERT_TRUE(cuda.device().is_cuda());
  // Both orders: the first input decides which backend would run.
  for (const auto& [a, b] : {std::pair<Tensor, Tensor>{cpu, cuda},
                             std::pair<Tensor, Tensor>{cuda, cpu}}) {
    SCOPED_TRACE("input 0 on " + a.device().ToString());
    ExpectError([&] { Add(a, b); }, {"cuda:0", "cpu"});
    ExpectError([&] { Matmul(a, b); }, {"cuda:0", "cpu"});
    ExpectError([&] { Concat({a, b}, 0); }, {"cuda:0", "cpu"});
  }
}

}  // namespace
}  // namespace lc
