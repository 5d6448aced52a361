#include "core/memory.h"

#include <algorithm>
#include <cstdlib>
#include <map>

#include "core/check.h"
#include "core/cuda.h"
#include "core/status.h"

namespace lc {

void MemoryTracker::RecordAlloc(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.current_bytes += bytes;
  stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.current_bytes);
  ++stats_.num_allocs;
}

void MemoryTracker::RecordFree(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.current_bytes -= bytes;
  ++stats_.num_frees;
}

MemoryStats MemoryTracker::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void MemoryTracker::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.peak_bytes = stats_.current_bytes;
  stats_.num_allocs = 0;
  stats_.num_frees = 0;
}

MemoryTracker& DeviceMemoryTracker(Device device) {
  static std::mutex mu;
  // Trackers are never destroyed: buffers may be freed during static
  // destruction.
  static auto* trackers = new std::map<std::pair<int, int>, MemoryTracker>();
  std::lock_guard<std::mutex> lock(mu);
  return (*trackers)[{static_cast<int>(device.type), device.index}];
}

namespace {

std::vector<std::shared_ptr<MemoryTracker>>& ScopeStack() {
  thread_local std::vector<std::shared_ptr<MemoryTracker>> stack;
  return stack;
}

// 64-byte aligned host memory, so vectorized kernels may use aligned loads.
class CpuAllocator : public Allocator {
 public:
  void* Allocate(int64_t bytes, Device) override {
    const size_t rounded = (static_cast<size_t>(bytes) + 63) / 64 * 64;
    void* ptr = std::aligned_alloc(64, std::max<size_t>(rounded, 64));
    if (ptr == nullptr) {
      throw Error(absl::ResourceExhaustedError(
          absl::StrCat("CPU allocation of ", bytes, " bytes failed")));
    }
    return ptr;
  }
  void Deallocate(void* ptr, int64_t, Device) override { std::free(ptr); }
};

struct AllocatorRegistry {
  std::mutex mu;
  Allocator* cpu = nullptr;
  Allocator* cuda = nullptr;
};

AllocatorRegistry& Registry() {
  static auto* registry = new AllocatorRegistry();
  return *registry;
}

}  // namespace

MemoryScope::MemoryScope(std::shared_ptr<MemoryTracker> tracker) {
  LC_CHECK(tracker != nullptr);
  ScopeStack().push_back(std::move(tracker));
}

MemoryScope::~MemoryScope() { ScopeStack().pop_back(); }

const std::vector<std::shared_ptr<MemoryTracker>>& MemoryScope::Active() {
  return ScopeStack();
}

Allocator* GetAllocator(Device device) {
  static auto* cpu_default = new CpuAllocator();
  AllocatorRegistry& registry = Registry();
  std::lock_guard<std::mutex> lock(registry.mu);
  if (device.is_cpu()) {
    return registry.cpu != nullptr ? registry.cpu : cpu_default;
  }
  return registry.cuda != nullptr ? registry.cuda : DefaultCudaAllocator();
}

void SetAllocator(DeviceType type, Allocator* allocator) {
  AllocatorRegistry& registry = Registry();
  std::lock_guard<std::mutex> lock(registry.mu);
  (type == DeviceType::kCpu ? registry.cpu : registry.cuda) = allocator;
}

std::shared_ptr<Storage> Storage::Allocate(int64_t nbytes, Device device) {
  LC_CHECK_GE(nbytes, 0);
  Allocator* allocator = GetAllocator(device);
  void* data = allocator->Allocate(nbytes, device);  // may throw
  std::shared_ptr<Storage> storage(new Storage());
  storage->device_ = device;
  storage->nbytes_ = nbytes;
  storage->allocator_ = allocator;
  storage->data_ = data;
  storage->scopes_ = ScopeStack();
  DeviceMemoryTracker(device).RecordAlloc(nbytes);
  for (const auto& scope : storage->scopes_) scope->RecordAlloc(nbytes);
  return storage;
}

Storage::~Storage() {
  allocator_->Deallocate(data_, nbytes_, device_);
  DeviceMemoryTracker(device_).RecordFree(nbytes_);
  for (const auto& scope : scopes_) scope->RecordFree(nbytes_);
}

}  // namespace lc
