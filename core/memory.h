// Allocators and memory statistics. Every tensor buffer is allocated through
// the Allocator registered for its device (pluggable, e.g. a caching CUDA
// allocator) and recorded in two places: the device's tracker, and every
// MemoryScope alive on the allocating thread - so a rank running as a thread
// can measure its own current and peak bytes.
#ifndef LONGCTX_CORE_MEMORY_H_
#define LONGCTX_CORE_MEMORY_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "core/device.h"

namespace lc {

struct MemoryStats {
  int64_t current_bytes = 0;  // bytes allocated and not yet freed
  int64_t peak_bytes = 0;     // max of current_bytes since the last reset
  int64_t num_allocs = 0;     // allocations since the last reset
  int64_t num_frees = 0;      // frees since the last reset
};

// Thread-safe counters for one device or one scope.
class MemoryTracker {
 public:
  void RecordAlloc(int64_t bytes);
  void RecordFree(int64_t bytes);
  MemoryStats stats() const;
  // Sets peak to current and zeroes the counts; current bytes stay, since the
  // memory they count is still allocated.
  void Reset();

 private:
  mutable std::mutex mu_;
  MemoryStats stats_;
};

// The tracker of all allocations on `device`.
MemoryTracker& DeviceMemoryTracker(Device device);
inline MemoryStats DeviceMemoryStats(Device device) {
  return DeviceMemoryTracker(device).stats();
}

// While alive, attributes every allocation made on this thread to `tracker`
// (in addition to the device tracker and any enclosing scopes). The free is
// recorded in the same trackers, whichever thread frees the buffer.
class MemoryScope {
 public:
  explicit MemoryScope(std::shared_ptr<MemoryTracker> tracker);
  ~MemoryScope();
  MemoryScope(const MemoryScope&) = delete;
  MemoryScope& operator=(const MemoryScope&) = delete;

  // The trackers of the scopes alive on this thread, outermost first.
  static const std::vector<std::shared_ptr<MemoryTracker>>& Active();
};

// Raw memory for one device. Implementations throw lc::Error with code
// ResourceExhausted when they cannot allocate.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* Allocate(int64_t bytes, Device device) = 0;
  virtual void Deallocate(void* ptr, int64_t bytes, Device device) = 0;
};

// The allocator used for new buffers on `device`.
Allocator* GetAllocator(Device device);
// Replaces the allocator of every device of `type` (not owned; must outlive
// every buffer it allocates); nullptr restores the default.
void SetAllocator(DeviceType type, Allocator* allocator);

// A buffer of bytes on one device, freed (and recorded as freed) when the
// last tensor using it goes away.
class Storage {
 public:
  // Throws lc::Error when the device's allocator fails.
  static std::shared_ptr<Storage> Allocate(int64_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  int64_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  Storage() = default;
  void* data_ = nullptr;
  int64_t nbytes_ = 0;
  Device device_;
  Allocator* allocator_ = nullptr;
  std::vector<std::shared_ptr<MemoryTracker>> scopes_;
};

}  // namespace lc

#endif  // LONGCTX_CORE_MEMORY_H_
