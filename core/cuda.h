// The CUDA runtime as the core sees it: device discovery, the default CUDA
// allocator and byte copies between any two devices. Built on every machine
// (it links only the CUDA runtime library); on a machine without a GPU,
// CudaDeviceCount() is 0 and CUDA allocations fail with a clear error.
#ifndef LONGCTX_CORE_CUDA_H_
#define LONGCTX_CORE_CUDA_H_

#include <cstdint>

#include "core/device.h"
#include "core/memory.h"

namespace lc {

// Number of usable CUDA devices; 0 when there is no driver or no GPU.
int CudaDeviceCount();

// cudaMalloc / cudaFree on the device's ordinal.
Allocator* DefaultCudaAllocator();

// Copies `bytes` bytes between buffers on any two devices (blocking).
// Throws lc::Error when a CUDA device is involved and CUDA fails.
void CopyBytes(void* dst, Device dst_device, const void* src, Device src_device,
               int64_t bytes);

}  // namespace lc

#endif  // LONGCTX_CORE_CUDA_H_
