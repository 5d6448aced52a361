#include "core/cuda.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <map>

#include "core/check.h"
#include "core/status.h"

namespace lc {
namespace internal {

void ThrowCudaError(cudaError_t err, const char* expr, const char* file,
                    int line) {
  cudaGetLastError();  // Clear a non-sticky error so later calls start clean.
  const absl::StatusCode code = err == cudaErrorMemoryAllocation
                                    ? absl::StatusCode::kResourceExhausted
                                    : absl::StatusCode::kInternal;
  throw Error(absl::Status(
      code,
      absl::StrCat(expr, " failed at ", file, ":", line, ": ",
                   cudaGetErrorName(err), " (", cudaGetErrorString(err), ")")));
}

void CheckCudaLaunch(const char* kernel_name, const char* file, int line) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  throw Error(absl::InternalError(absl::StrCat(
      "launch of CUDA kernel ", kernel_name, " failed at ", file, ":", line,
      ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")")));
}

}  // namespace internal

namespace {

// The streams of this thread: its own stream per device (created on first
// use) and the overrides of any CudaStreamGuard alive.
struct ThreadStreams {
  std::map<int, cudaStream_t> own;
  std::map<int, cudaStream_t> current;
  ~ThreadStreams() {
    for (const auto& [device, stream] : own) {
      // The runtime may already be shut down at thread exit of the main
      // thread; a failure to destroy is harmless then.
      cudaSetDevice(device);
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }
};

ThreadStreams& Streams() {
  thread_local ThreadStreams streams;
  return streams;
}

// The copy of CopyBytes between two CUDA devices: on the destination's
// current stream, after the work queued so far on the source's current
// stream (which produced the bytes), and before any later work on that
// stream (which may reuse the source buffer once it is freed).
void CopyBetweenCudaDevices(void* dst, int dst_device, const void* src,
                            int src_device, int64_t bytes) {
  const cudaStream_t src_stream = CurrentCudaStream(src_device);
  const cudaStream_t dst_stream = CurrentCudaStream(dst_device);
  CudaEvent source_ready(src_device);
  source_ready.Record(src_stream);
  source_ready.Wait(dst_stream);
  SetCudaDevice(dst_device);
  LC_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes),
                                cudaMemcpyDefault, dst_stream));
  CudaEvent copied(dst_device);
  copied.Record(dst_stream);
  copied.Wait(src_stream);
}

}  // namespace

int CudaDeviceCount() {
  // Devices do not come and go within a process: asked once (SetCudaDevice
  // runs before every allocation and GEMM).
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // Clear the sticky "no driver" error.
      return 0;
    }
    return n;
  }();
  return count;
}

void SetCudaDevice(int index) {
  const int count = CudaDeviceCount();
  LC_REQUIRE(index >= 0 && index < count, "CUDA device ", index,
             " does not exist (this machine has ", count, " CUDA devices)");
  LC_CUDA_CHECK(cudaSetDevice(index));
}

cudaStream_t CurrentCudaStream(int device) {
  ThreadStreams& streams = Streams();
  auto current = streams.current.find(device);
  if (current != streams.current.end()) return current->second;
  auto own = streams.own.find(device);
  if (own != streams.own.end()) return own->second;
  SetCudaDevice(device);
  cudaStream_t stream = nullptr;
  LC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  streams.own[device] = stream;
  return stream;
}

void SynchronizeCudaStream(int device) {
  LC_CUDA_CHECK(cudaStreamSynchronize(CurrentCudaStream(device)));
}

CudaStream::CudaStream(int device) : device_(device) {
  SetCudaDevice(device);
  LC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

CudaStream::~CudaStream() {
  cudaSetDevice(device_);
  cudaStreamSynchronize(stream_);
  cudaStreamDestroy(stream_);
}

CudaStreamGuard::CudaStreamGuard(int device, cudaStream_t stream)
    : device_(device) {
  ThreadStreams& streams = Streams();
  auto it = streams.current.find(device);
  if (it != streams.current.end()) {
    had_previous_ = true;
    previous_ = it->second;
  }
  streams.current[device] = stream;
}

CudaStreamGuard::~CudaStreamGuard() {
  ThreadStreams& streams = Streams();
  if (had_previous_) {
    streams.current[device_] = previous_;
  } else {
    streams.current.erase(device_);
  }
}

CudaEvent::CudaEvent(int device) : device_(device) {
  SetCudaDevice(device);
  LC_CUDA_CHECK(cudaEventCreate(&event_));
}

CudaEvent::~CudaEvent() {
  cudaSetDevice(device_);
  cudaEventDestroy(event_);
}

void CudaEvent::Record(cudaStream_t stream) {
  SetCudaDevice(device_);
  LC_CUDA_CHECK(cudaEventRecord(event_, stream));
}

void CudaEvent::Wait(cudaStream_t stream) const {
  LC_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}

void CudaEvent::Synchronize() const {
  LC_CUDA_CHECK(cudaEventSynchronize(event_));
}

bool CudaEvent::Done() const {
  const cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  LC_CUDA_CHECK(err);
  return true;
}

float CudaEvent::ElapsedMsSince(const CudaEvent& start) const {
  float ms = 0;
  LC_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
  return ms;
}

PinnedBuffer::PinnedBuffer(int64_t bytes) : bytes_(bytes) {
  LC_REQUIRE(bytes >= 0, "PinnedBuffer: size ", bytes, " (expected >= 0)");
  LC_REQUIRE(CudaDeviceCount() > 0,
             "PinnedBuffer: pinned host memory needs a CUDA device (this "
             "machine has none)");
  LC_CUDA_CHECK(cudaMallocHost(&data_, static_cast<size_t>(bytes)));
}

PinnedBuffer::~PinnedBuffer() { cudaFreeHost(data_); }

void CopyBytes(void* dst, Device dst_device, const void* src, Device src_device,
               int64_t bytes) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
  if (dst_device.is_cuda() && src_device.is_cuda() &&
      dst_device.index != src_device.index) {
    CopyBetweenCudaDevices(dst, dst_device.index, src, src_device.index, bytes);
    return;
  }
  const int device = dst_device.is_cuda() ? dst_device.index : src_device.index;
  SetCudaDevice(device);
  const cudaStream_t stream = CurrentCudaStream(device);
  LC_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes),
                                cudaMemcpyDefault, stream));
  if (dst_device.is_cpu() || src_device.is_cpu()) {
    LC_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
}

}  // namespace lc
