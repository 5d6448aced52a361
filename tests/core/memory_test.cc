#include "core/memory.h"

#include <thread>

#include "core/tensor.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

TEST(MemoryTest, AllocationAndFreeMoveCurrentAndPeakExactly) {
  MemoryTracker& device = DeviceMemoryTracker(Device::Cpu());
  device.Reset();
  const MemoryStats start = device.stats();
  {
    Tensor a = Empty({1000}, DType::kFloat32);    // 4000 bytes
    Tensor b = Empty({10, 10}, DType::kFloat64);  // 800 bytes
    const MemoryStats s = device.stats();
    EXPECT_EQ(s.current_bytes - start.current_bytes, 4800);
    EXPECT_EQ(s.peak_bytes - start.current_bytes, 4800);
    EXPECT_EQ(s.num_allocs, 2);
  }
  const MemoryStats end = device.stats();
  EXPECT_EQ(end.current_bytes, start.current_bytes);
  EXPECT_EQ(end.peak_bytes - start.current_bytes, 4800);
  EXPECT_EQ(end.num_frees, 2);
  device.Reset();
  EXPECT_EQ(device.stats().peak_bytes, device.stats().current_bytes);
  EXPECT_EQ(device.stats().num_allocs, 0);
}

TEST(MemoryTest, ViewsAllocateNothing) {
  auto tracker = std::make_shared<MemoryTracker>();
  Tensor t = Zeros({4, 4});
  MemoryScope scope(tracker);
  Tensor v =
      t.transpose(0, 1).slice(0, 0, 4, 2).unsqueeze(0).permute({2, 1, 0});
  (void)v;
  EXPECT_EQ(tracker->stats().num_allocs, 0);
}

TEST(MemoryTest, ScopesAttributeAllocationsOfTheirThread) {
  auto outer = std::make_shared<MemoryTracker>();
  auto inner = std::make_shared<MemoryTracker>();
  auto other = std::make_shared<MemoryTracker>();
  Tensor kept;
  {
    MemoryScope outer_scope(outer);
    Tensor a = Empty({100}, DType::kFloat32);  // 400 bytes, outer only
    {
      MemoryScope inner_scope(inner);
      kept = Empty({50}, DType::kFloat64);  // 400 bytes, both
    }
    // Another thread's allocations go to its own scope, not ours.
    std::thread([&] {
      MemoryScope scope(other);
      Tensor t = Empty({25}, DType::kFloat64);  // 200 bytes
    }).join();
    EXPECT_EQ(outer->stats().current_bytes, 800);
    EXPECT_EQ(inner->stats().current_bytes, 400);
  }
  EXPECT_EQ(outer->stats().current_bytes, 400);  // `a` freed, `kept` alive
  EXPECT_EQ(outer->stats().peak_bytes, 800);
  EXPECT_EQ(other->stats().current_bytes, 0);
  EXPECT_EQ(other->stats().peak_bytes, 200);
  // A free on another thread is recorded in the allocating scope.
  std::thread([&] { kept = Tensor(); }).join();
  EXPECT_EQ(inner->stats().current_bytes, 0);
  EXPECT_EQ(outer->stats().current_bytes, 0);
  EXPECT_EQ(inner->stats().num_frees, 1);
}

class CountingAllocator : public Allocator {
 public:
  void* Allocate(int64_t bytes, Device device) override {
    ++allocations;
    return GetDefault()->Allocate(bytes, device);
  }
  void Deallocate(void* ptr, int64_t bytes, Device device) override {
    ++deallocations;
    GetDefault()->Deallocate(ptr, bytes, device);
  }
  Allocator* GetDefault() { return default_allocator; }
  Allocator* default_allocator = nullptr;
  int allocations = 0;
  int deallocations = 0;
};

TEST(MemoryTest, AllocatorsArePluggable) {
  CountingAllocator counting;
  counting.default_allocator = GetAllocator(Device::Cpu());
  SetAllocator(DeviceType::kCpu, &counting);
  {
    Tensor t = Ones({8});
    EXPECT_EQ(t.ToVector(), std::vector<double>(8, 1.0));
  }
  SetAllocator(DeviceType::kCpu, nullptr);
  EXPECT_EQ(counting.allocations, 2);  // Ones, and ToVector's float64 copy
  EXPECT_EQ(counting.deallocations, 2);
  EXPECT_EQ(GetAllocator(Device::Cpu()), counting.default_allocator);
}

}  // namespace
}  // namespace lc
