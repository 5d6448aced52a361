#include <cuda_runtime.h>

#include <string>

#include "core/fill_cuda.h"
#include "core/status.h"

namespace lc {
namespace {

// out[i] = value for i in [0, n): one thread per element, grid-stride loop.
template <typename T>
__global__ void FillKernel(T* out, int64_t n, T value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = value;
  }
}

template <typename T>
void Launch(void* data, int64_t numel, T value) {
  if (numel == 0) return;
  const int threads = 256;
  const int64_t blocks = (numel + threads - 1) / threads;
  FillKernel<T>
      <<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads>>>(
          static_cast<T*>(data), numel, value);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw Error(absl::InternalError(std::string("FillCuda launch: ") +
                                    cudaGetErrorString(err)));
  }
}

}  // namespace

void FillCuda(void* data, DType dtype, int64_t numel, double value) {
  switch (dtype) {
    case DType::kFloat32:
      return Launch<float>(data, numel, static_cast<float>(value));
    case DType::kFloat64:
      return Launch<double>(data, numel, value);
    case DType::kBFloat16:
      return Launch<uint16_t>(data, numel,
                              bfloat16::FromFloat(static_cast<float>(value)));
    case DType::kInt64:
      return Launch<int64_t>(data, numel, static_cast<int64_t>(value));
    case DType::kUInt8:
      return Launch<uint8_t>(data, numel, static_cast<uint8_t>(value));
  }
}

}  // namespace lc
