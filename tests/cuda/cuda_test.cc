// GPU checks of the core's CUDA path. Each test skips itself when no CUDA
// device is present; with LC_REQUIRE_GPU=1 in the environment (the device
// runs set it) a missing GPU is a failure instead of a skip.
#include "core/cuda.h"

#include <cstdlib>

#include "core/status.h"
#include "core/tensor.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() > 0) return;
    const char* required = std::getenv("LC_REQUIRE_GPU");
    if (required != nullptr && std::string(required) == "1") {
      FAIL() << "LC_REQUIRE_GPU=1 but no CUDA device is visible";
    }
    GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(CudaTest, FillKernelWritesEveryElementOfEveryDtype) {
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kBFloat16,
                      DType::kInt64, DType::kUInt8}) {
    // Odd size: the grid-stride loop must cover the tail.
    Tensor t = Full({1000003}, 3.0, dtype, Device::Cuda(0));
    EXPECT_TRUE(t.device().is_cuda());
    const std::vector<double> host = t.ToVector();
    ASSERT_EQ(host.size(), 1000003u);
    for (size_t i = 0; i < host.size(); ++i) {
      ASSERT_EQ(host[i], 3.0) << DTypeName(dtype) << " element " << i;
    }
  }
}

TEST_F(CudaTest, CopiesRoundTripAndMemoryIsCounted) {
  MemoryTracker& tracker = DeviceMemoryTracker(Device::Cuda(0));
  const int64_t before = tracker.stats().current_bytes;
  Tensor host = Arange(0, 1000, 1, DType::kFloat32).reshape({10, 100});
  {
    Tensor device = host.to(Device::Cuda(0));
    EXPECT_EQ(tracker.stats().current_bytes - before, 4000);
    EXPECT_EQ(device.at({3, 7}), 307);
    EXPECT_EQ(device.to(Device::Cpu()).ToVector(), host.ToVector());
    // A strided host source is packed before the copy.
    Tensor strided = Zeros({100, 10}, DType::kFloat32, Device::Cuda(0));
    CopyInto(strided, host.transpose(0, 1));
    EXPECT_EQ(strided.at({7, 3}), 307);
  }
  EXPECT_EQ(tracker.stats().current_bytes, before);
}

TEST_F(CudaTest, ImpossibleAllocationIsAClearError) {
  try {
    Empty({int64_t{1} << 50}, DType::kFloat32, Device::Cuda(0));
    ADD_FAILURE() << "expected an out-of-memory error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
  }
}

TEST(CudaDeviceTest, MissingDeviceIsAClearError) {
  const int count = CudaDeviceCount();
  try {
    Zeros({2}, DType::kFloat32, Device::Cuda(count));
    ADD_FAILURE() << "expected an error for cuda:" << count;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.status().message()).find("does not exist"),
              std::string::npos)
        << e.status();
  }
}

}  // namespace
}  // namespace lc
