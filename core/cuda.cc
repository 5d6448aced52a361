#include "core/cuda.h"

#include <cuda_runtime_api.h>

#include <cstring>

#include "core/check.h"
#include "core/status.h"

namespace lc {
namespace {

void ThrowIfCudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  const absl::StatusCode code = err == cudaErrorMemoryAllocation
                                    ? absl::StatusCode::kResourceExhausted
                                    : absl::StatusCode::kInternal;
  throw Error(
      absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorName(err), " (",
                                      cudaGetErrorString(err), ")")));
}

void SetDevice(int index) {
  const int count = CudaDeviceCount();
  LC_REQUIRE(index >= 0 && index < count, "CUDA device ", index,
             " does not exist (this machine has ", count, " CUDA devices)");
  ThrowIfCudaError(cudaSetDevice(index), "cudaSetDevice");
}

class CudaAllocator : public Allocator {
 public:
  void* Allocate(int64_t bytes, Device device) override {
    SetDevice(device.index);
    void* ptr = nullptr;
    ThrowIfCudaError(cudaMalloc(&ptr, static_cast<size_t>(bytes)),
                     absl::StrCat("cudaMalloc of ", bytes, " bytes").c_str());
    return ptr;
  }
  void Deallocate(void* ptr, int64_t, Device device) override {
    // The device existed when the buffer was allocated; failing to free it
    // is an internal error, not a user one (and destructors must not throw).
    LC_CHECK(cudaSetDevice(device.index) == cudaSuccess);
    const cudaError_t err = cudaFree(ptr);
    LC_CHECK(err == cudaSuccess) << "cudaFree: " << cudaGetErrorString(err);
  }
};

}  // namespace

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // Clear the sticky "no driver" error.
    return 0;
  }
  return count;
}

Allocator* DefaultCudaAllocator() {
  static auto* allocator = new CudaAllocator();
  return allocator;
}

void CopyBytes(void* dst, Device dst_device, const void* src, Device src_device,
               int64_t bytes) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
  SetDevice(dst_device.is_cuda() ? dst_device.index : src_device.index);
  ThrowIfCudaError(
      cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault),
      "cudaMemcpy");
}

}  // namespace lc
