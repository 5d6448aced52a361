// The caching CUDA allocator behind DefaultCudaAllocator() (core/cuda.h).
//
// Size classes: a request of at most 1 MiB is rounded up to a multiple of
// 512 bytes (at least 512, so a zero-byte request gets a block and a unique
// pointer too); a larger one to a multiple of 2 MiB. Blocks are never split.
//
// Pools: each device keeps its cached blocks per stream. A block belongs to
// the stream that was current on the allocating thread; when its tensor is
// freed, on whatever thread, it returns to that stream's pool, and only an
// allocation on that stream reuses it, so stream order makes the reuse safe.
// The best fit is the smallest cached block of the stream at least as large
// as the rounded request and at most 25% larger: without splitting, a looser
// fit would strand memory in big blocks that later big requests then cannot
// use (more cudaMalloc, higher peak reserve).
//
// Other streams: RecordStream adds a stream that uses the block; at free an
// event is recorded on each such stream and the block waits outside the pool
// until all of its events have completed (checked at each allocation).
//
// Out of memory: when cudaMalloc fails, the device is synchronized, every
// cached block of the device goes back to the driver (cudaFree), and the
// cudaMalloc is retried once; a second failure throws lc::Error
// ResourceExhausted naming the request, the device and the allocator's
// reserved and cached bytes.
//
// Each device has its own mutex, so a device stalled in the out-of-memory
// path (a device-wide synchronize) does not stop allocations on another one.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/cuda.h"
#include "core/status.h"

namespace lc {
namespace {

constexpr int64_t kSmallRound = 512;
constexpr int64_t kSmallMax = int64_t{1} << 20;
constexpr int64_t kLargeRound = int64_t{2} << 20;

// The size class of a request of `bytes` (see the top of the file).
int64_t RoundSize(int64_t bytes) {
  if (bytes <= kSmallMax) {
    return std::max(kSmallRound,
                    (bytes + kSmallRound - 1) / kSmallRound * kSmallRound);
  }
  // Beyond any device's memory: left as is, cudaMalloc reports the failure.
  if (bytes > std::numeric_limits<int64_t>::max() - kLargeRound) return bytes;
  return (bytes + kLargeRound - 1) / kLargeRound * kLargeRound;
}

// Whether a cached block of `size` bytes may serve a request of size class
// `rounded`.
bool Fits(int64_t size, int64_t rounded) {
  return size >= rounded && size - rounded <= rounded / 4;
}

// One cudaMalloc'ed buffer.
struct Block {
  void* ptr = nullptr;
  int64_t size = 0;
  cudaStream_t stream = nullptr;  // the allocating stream: the block's pool
  bool in_use = false;
  std::vector<cudaStream_t> used_by;  // other streams, from RecordStream
  std::vector<cudaEvent_t> events;    // recorded at free on `used_by`
};

// Free blocks ordered by (stream, size, address): the best fit on a stream is
// the lower bound of (stream, rounded size, null).
struct BlockOrder {
  bool operator()(const Block* a, const Block* b) const {
    const auto sa = reinterpret_cast<uintptr_t>(a->stream);
    const auto sb = reinterpret_cast<uintptr_t>(b->stream);
    if (sa != sb) return sa < sb;
    if (a->size != b->size) return a->size < b->size;
    return reinterpret_cast<uintptr_t>(a->ptr) <
           reinterpret_cast<uintptr_t>(b->ptr);
  }
};

// The state of one device, guarded by `mu`.
struct DeviceCache {
  std::mutex mu;
  // Every block held from cudaMalloc, in use or cached, by address.
  std::unordered_map<void*, std::unique_ptr<Block>> blocks;
  // Cached blocks ready for reuse.
  std::set<Block*, BlockOrder> ready;
  // Cached blocks waiting for the events of other streams.
  std::vector<Block*> pending;
  CudaCacheStats stats;
};

// Checks a CUDA call on the free path, which must not throw.
void CheckOnFree(cudaError_t err, const char* what) {
  LC_CHECK(err == cudaSuccess) << what << ": " << cudaGetErrorName(err) << " ("
                               << cudaGetErrorString(err) << ")";
}

// Makes `device` current for a scope and restores the previous device, so
// freeing a block does not move the freeing thread to another device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    CheckOnFree(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      CheckOnFree(cudaSetDevice(device), "cudaSetDevice");
    }
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

class CachingAllocator : public Allocator {
 public:
  CachingAllocator() {
    const int count = CudaDeviceCount();
    for (int i = 0; i < count; ++i) {
      caches_.push_back(std::make_unique<DeviceCache>());
    }
  }

  void* Allocate(int64_t bytes, Device device) override {
    LC_CHECK(device.is_cuda()) << device.ToString();
    LC_CHECK_GE(bytes, 0);
    SetCudaDevice(device.index);  // throws for a missing device
    const cudaStream_t stream = CurrentCudaStream(device.index);
    const int64_t rounded = RoundSize(bytes);
    DeviceCache& cache = Cache(device.index);
    std::lock_guard<std::mutex> lock(cache.mu);
    CollectFinishedFrees(cache);

    Block key;
    key.stream = stream;
    key.size = rounded;
    const auto it = cache.ready.lower_bound(&key);
    if (it != cache.ready.end() && (*it)->stream == stream &&
        Fits((*it)->size, rounded)) {
      Block* block = *it;
      cache.ready.erase(it);
      block->in_use = true;
      cache.stats.cached_bytes -= block->size;
      ++cache.stats.cache_hits;
      return block->ptr;
    }

    void* ptr = nullptr;
    cudaError_t err = cudaMalloc(&ptr, static_cast<size_t>(rounded));
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // Clear it: the retry may succeed.
      const CudaCacheStats before = cache.stats;
      ++cache.stats.oom_retries;
      ReleaseCached(cache);
      err = cudaMalloc(&ptr, static_cast<size_t>(rounded));
      if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        size_t free_bytes = 0, total_bytes = 0;
        if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
          cudaGetLastError();
        }
        throw Error(absl::ResourceExhaustedError(absl::StrCat(
            "CUDA out of memory: cannot allocate ", bytes, " bytes (", rounded,
            " with rounding) on ", device.ToString(),
            " even after releasing the cache and retrying once; the caching "
            "allocator held ",
            before.reserved_bytes, " bytes reserved, of which ",
            before.cached_bytes, " were cached (now released); the device has ",
            free_bytes, " of ", total_bytes, " bytes free")));
      }
    }
    LC_CUDA_CHECK(err);
    auto block = std::make_unique<Block>();
    block->ptr = ptr;
    block->size = rounded;
    block->stream = stream;
    block->in_use = true;
    cache.blocks.emplace(ptr, std::move(block));
    cache.stats.reserved_bytes += rounded;
    cache.stats.peak_reserved_bytes =
        std::max(cache.stats.peak_reserved_bytes, cache.stats.reserved_bytes);
    ++cache.stats.cuda_mallocs;
    return ptr;
  }

  void Deallocate(void* ptr, int64_t, Device device) override {
    DeviceCache& cache = Cache(device.index);
    std::lock_guard<std::mutex> lock(cache.mu);
    const auto it = cache.blocks.find(ptr);
    LC_CHECK(it != cache.blocks.end())
        << "freeing " << ptr << " on " << device.ToString()
        << ", which the caching CUDA allocator did not allocate";
    Block* block = it->second.get();
    LC_CHECK(block->in_use) << "double free of " << ptr;
    block->in_use = false;
    cache.stats.cached_bytes += block->size;
    if (block->used_by.empty()) {
      cache.ready.insert(block);
      return;
    }
    DeviceScope scope(device.index);
    for (cudaStream_t stream : block->used_by) {
      cudaEvent_t event = nullptr;
      CheckOnFree(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                  "cudaEventCreateWithFlags");
      CheckOnFree(cudaEventRecord(event, stream), "cudaEventRecord");
      block->events.push_back(event);
    }
    block->used_by.clear();
    cache.pending.push_back(block);
  }

  void RecordStream(const Storage& storage, cudaStream_t stream) {
    LC_REQUIRE(storage.device().is_cuda(), "RecordStream: the storage is on ",
               storage.device().ToString(), " (expected a CUDA device)");
    DeviceCache& cache = Cache(storage.device().index);
    std::lock_guard<std::mutex> lock(cache.mu);
    const auto it = cache.blocks.find(storage.data());
    LC_REQUIRE(it != cache.blocks.end() && it->second->in_use,
               "RecordStream: the storage at 0x",
               absl::Hex(reinterpret_cast<uintptr_t>(storage.data())), " on ",
               storage.device().ToString(),
               " was not allocated by the caching CUDA allocator (expected "
               "the default CUDA allocator)");
    int stream_device = 0;
    LC_CUDA_CHECK(cudaStreamGetDevice(stream, &stream_device));
    LC_REQUIRE(stream_device == storage.device().index,
               "RecordStream: the stream is on cuda:", stream_device,
               " but the storage on ", storage.device().ToString(),
               " (expected a stream of the storage's device)");
    Block* block = it->second.get();
    if (stream == block->stream) return;
    if (std::find(block->used_by.begin(), block->used_by.end(), stream) ==
        block->used_by.end()) {
      block->used_by.push_back(stream);
    }
  }

  CudaCacheStats Stats(int device) {
    DeviceCache& cache = CheckedCache(device, "CudaCachingAllocatorStats");
    std::lock_guard<std::mutex> lock(cache.mu);
    return cache.stats;
  }

  void ResetStats(int device) {
    DeviceCache& cache = CheckedCache(device, "ResetCudaCachingAllocatorStats");
    std::lock_guard<std::mutex> lock(cache.mu);
    cache.stats.cuda_mallocs = 0;
    cache.stats.cache_hits = 0;
    cache.stats.oom_retries = 0;
    cache.stats.peak_reserved_bytes = cache.stats.reserved_bytes;
  }

  void EmptyCache() {
    if (caches_.empty()) return;  // no CUDA device
    int previous = 0;
    LC_CUDA_CHECK(cudaGetDevice(&previous));
    for (size_t device = 0; device < caches_.size(); ++device) {
      DeviceCache& cache = *caches_[device];
      std::lock_guard<std::mutex> lock(cache.mu);
      if (cache.ready.empty() && cache.pending.empty()) continue;
      LC_CUDA_CHECK(cudaSetDevice(static_cast<int>(device)));
      ReleaseCached(cache);
    }
    LC_CUDA_CHECK(cudaSetDevice(previous));
  }

 private:
  // The cache of an existing device (callers checked the index).
  DeviceCache& Cache(int device) {
    LC_CHECK(device >= 0 && device < static_cast<int>(caches_.size()))
        << "CUDA device " << device;
    return *caches_[device];
  }

  // The cache of `device`, or lc::Error naming `what` and the index.
  DeviceCache& CheckedCache(int device, const char* what) {
    const int count = static_cast<int>(caches_.size());
    LC_REQUIRE(device >= 0 && device < count, what, ": CUDA device ", device,
               " does not exist (this machine has ", count, " CUDA devices)");
    return *caches_[device];
  }

  // Moves pending blocks whose events have all completed into the pool.
  static void CollectFinishedFrees(DeviceCache& cache) {
    auto still_pending = cache.pending.begin();
    for (Block* block : cache.pending) {
      while (!block->events.empty()) {
        const cudaError_t err = cudaEventQuery(block->events.back());
        if (err == cudaErrorNotReady) {
          cudaGetLastError();
          break;
        }
        LC_CUDA_CHECK(err);
        LC_CUDA_CHECK(cudaEventDestroy(block->events.back()));
        block->events.pop_back();
      }
      if (block->events.empty()) {
        cache.ready.insert(block);
      } else {
        *still_pending++ = block;
      }
    }
    cache.pending.erase(still_pending, cache.pending.end());
  }

  // Synchronizes the current device (the cache's) and returns every cached
  // block to the driver.
  static void ReleaseCached(DeviceCache& cache) {
    LC_CUDA_CHECK(cudaDeviceSynchronize());
    // Every event was recorded on a stream of this device (RecordStream
    // checks), so all of them have completed now.
    CollectFinishedFrees(cache);
    LC_CHECK(cache.pending.empty());
    const std::vector<Block*> released(cache.ready.begin(), cache.ready.end());
    cache.ready.clear();
    for (Block* block : released) {
      LC_CUDA_CHECK(cudaFree(block->ptr));
      cache.stats.reserved_bytes -= block->size;
      cache.stats.cached_bytes -= block->size;
      cache.blocks.erase(block->ptr);  // deletes the block
    }
    LC_CHECK_EQ(cache.stats.cached_bytes, 0);
  }

  std::vector<std::unique_ptr<DeviceCache>> caches_;  // one per device
};

CachingAllocator& TheCachingAllocator() {
  // Never destroyed: tensors may be freed during static destruction.
  static auto* allocator = new CachingAllocator();
  return *allocator;
}

}  // namespace

Allocator* DefaultCudaAllocator() { return &TheCachingAllocator(); }

CudaCacheStats CudaCachingAllocatorStats(int device) {
  return TheCachingAllocator().Stats(device);
}

void ResetCudaCachingAllocatorStats(int device) {
  TheCachingAllocator().ResetStats(device);
}

void EmptyCudaCache() { TheCachingAllocator().EmptyCache(); }

void RecordStream(const Storage& storage, cudaStream_t stream) {
  TheCachingAllocator().RecordStream(storage, stream);
}

}  // namespace lc
