// The CUDA runtime as the rest of the project sees it: device discovery,
// error checks that name file and line, per-thread streams and events, the
// caching CUDA allocator's statistics, pinned host buffers and byte copies
// between any two devices. Built on every machine (it links only the CUDA
// runtime library); on a machine without a GPU CudaDeviceCount() is 0 and any
// CUDA allocation fails with a clear error.
//
// Streams: every CUDA kernel or copy an op issues goes on
// CurrentCudaStream(device) of the calling thread. Each host thread gets its
// own stream per device (created on first use, non-blocking), so k ranks
// running as threads on one GPU run concurrently; CudaStreamGuard switches a
// thread to another stream for a scope (e.g. a communication stream).
#ifndef LONGCTX_CORE_CUDA_H_
#define LONGCTX_CORE_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "core/device.h"
#include "core/memory.h"

namespace lc {

// Number of usable CUDA devices; 0 when there is no driver or no GPU.
int CudaDeviceCount();

// Makes CUDA device `index` current on this thread. Throws lc::Error naming
// the index when no such device exists.
void SetCudaDevice(int index);

namespace internal {
// Throws lc::Error (ResourceExhausted for out-of-memory, Internal otherwise)
// naming the expression, file, line and CUDA error. Clears the error first so
// a recoverable error (out of memory) does not stick to later calls.
void ThrowCudaError(cudaError_t err, const char* expr, const char* file,
                    int line);
void CheckCudaLaunch(const char* kernel_name, const char* file, int line);
}  // namespace internal

}  // namespace lc

// Throws lc::Error unless the CUDA runtime call `expr` returned cudaSuccess.
#define LC_CUDA_CHECK(expr)                                                    \
  do {                                                                         \
    const cudaError_t lc_cuda_err_ = (expr);                                   \
    if (lc_cuda_err_ != cudaSuccess) {                                         \
      ::lc::internal::ThrowCudaError(lc_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                          \
  } while (false)

// After a kernel launch: throws lc::Error naming the kernel if the launch
// failed (bad configuration, no kernel image for the device, ...).
#define LC_CUDA_CHECK_LAUNCH(kernel_name) \
  ::lc::internal::CheckCudaLaunch(kernel_name, __FILE__, __LINE__)

namespace lc {

// The stream this thread issues work on for CUDA device `device`.
cudaStream_t CurrentCudaStream(int device);
inline cudaStream_t CurrentCudaStream(Device device) {
  return CurrentCudaStream(device.index);
}

// Blocks until this thread's current stream for `device` has finished.
void SynchronizeCudaStream(int device);

// An owned CUDA stream (non-blocking), e.g. for communication that overlaps
// with compute.
class CudaStream {
 public:
  explicit CudaStream(int device);
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
};

// While alive, CurrentCudaStream(device) on this thread is `stream`; guards
// nest.
class CudaStreamGuard {
 public:
  CudaStreamGuard(int device, cudaStream_t stream);
  ~CudaStreamGuard();
  CudaStreamGuard(const CudaStreamGuard&) = delete;
  CudaStreamGuard& operator=(const CudaStreamGuard&) = delete;

 private:
  int device_;
  bool had_previous_ = false;  // whether an outer guard was alive
  cudaStream_t previous_ = nullptr;
};

// An owned CUDA event (timing enabled).
class CudaEvent {
 public:
  explicit CudaEvent(int device);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  void Record(cudaStream_t stream);
  // Makes `stream` wait (on the device, not the host) for the last Record.
  void Wait(cudaStream_t stream) const;
  void Synchronize() const;
  // Whether the work before the last Record has finished.
  bool Done() const;
  // Milliseconds between `start`'s and this event's records.
  float ElapsedMsSince(const CudaEvent& start) const;
  cudaEvent_t get() const { return event_; }

 private:
  int device_;
  cudaEvent_t event_ = nullptr;
};

// Statistics of the caching allocator of one device, beyond the tensor
// statistics of DeviceMemoryStats (which count bytes handed to tensors).
struct CudaCacheStats {
  int64_t reserved_bytes = 0;       // held from cudaMalloc: in use plus cached
  int64_t peak_reserved_bytes = 0;  // max of reserved_bytes since the reset
  int64_t cached_bytes = 0;         // freed by tensors, kept for reuse
  int64_t cuda_mallocs = 0;         // cudaMalloc calls since the last reset
  int64_t cache_hits = 0;           // allocations served from the cache
  int64_t oom_retries = 0;  // cudaMalloc failures retried after emptying
};

// The caching allocator serving CUDA tensors (the default CUDA allocator):
// blocks are rounded up to size classes and kept in per-stream pools when
// freed; an allocation first reuses a cached block freed on the same stream,
// then calls cudaMalloc, and when that fails it releases every cached block
// and retries once before reporting out-of-memory (lc::Error
// ResourceExhausted). Size classes and the fit rule: core/cuda_allocator.cc.
// A freed block returns to the pool of the stream that allocated it,
// whichever thread frees it; a tensor used on another stream (e.g. by
// another rank's thread) needs RecordStream before it is freed.
Allocator* DefaultCudaAllocator();
// Throw lc::Error naming the index for a missing device.
CudaCacheStats CudaCachingAllocatorStats(int device);
// Zeroes the counts and sets the peak to the current reserve.
void ResetCudaCachingAllocatorStats(int device);
// Returns every cached (unused) block of every device to the driver (after
// synchronizing each device that has some).
void EmptyCudaCache();
// Marks `storage` (allocated by the default CUDA allocator) as used by
// `stream`, a stream of the same device, as well as by the stream that
// allocated it: when freed, its block is reused only after the work queued
// on `stream` up to the free has finished.
void RecordStream(const Storage& storage, cudaStream_t stream);

// Page-locked host memory, for asynchronous host <-> device copies.
class PinnedBuffer {
 public:
  explicit PinnedBuffer(int64_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return data_; }
  int64_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

// Copies `bytes` bytes between buffers on any two devices. Device work goes
// on the current stream of the CUDA device involved (the destination's when
// both are CUDA; between two CUDA devices the copy also waits for the source
// device's current stream, and that stream for the copy, so both sides stay
// stream-ordered); the call returns when the copy has finished when either
// side is host memory, and may return earlier (stream-ordered) when both are
// on CUDA devices. Throws lc::Error when CUDA fails.
void CopyBytes(void* dst, Device dst_device, const void* src, Device src_device,
               int64_t bytes);

}  // namespace lc

#endif  // LONGCTX_CORE_CUDA_H_
