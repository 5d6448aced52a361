#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda.h"
#include "core/philox.h"
#include "ops/cuda_kernel.cuh"
#include "ops/dropout_cuda.h"

namespace lc {
namespace internal {
namespace {

constexpr int kThreads = 256;

// out[i] = PhiloxUniform(seed, offset, i) >= p ? in[o_i] * scale : 0 for i
// in [0, n), o_i the offset of row-major index i under `index`; out dense.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    DropoutKernel(const T* in, cuda::StridedIndexer<1> index, int64_t n,
                  uint64_t seed, uint64_t offset, double p, double scale,
                  T* out) {
  using C = cuda::compute_t<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    C v = 0;
    if (PhiloxUniform(seed, offset, static_cast<uint64_t>(i)) >= p) {
      int64_t in_offset[1];
      index.Offsets(i, in_offset);
      v = static_cast<C>(static_cast<double>(cuda::Load(in + in_offset[0])) *
                         scale);
    }
    cuda::Store(out + i, v);
  }
}

}  // namespace

void DropoutCuda(const Tensor& in, uint64_t seed, uint64_t offset, double p,
                 const Tensor& out) {
  const int64_t n = in.numel();
  if (n == 0) return;
  const Shape* strides[1] = {&in.strides()};
  const auto index = cuda::MakeCoalescedIndexer<1>(in.shape(), strides);
  const cudaStream_t stream = cuda::LaunchStream(in.device());
  LC_CUDA_DISPATCH_FLOATING(in.dtype(), "Dropout", [&] {
    DropoutKernel<<<cuda::GridFor(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(in.raw_data()), index, n, seed, offset, p,
        1.0 / (1.0 - p), static_cast<scalar_t*>(out.raw_data()));
    LC_CUDA_CHECK_LAUNCH("Dropout");
  });
}

}  // namespace internal
}  // namespace lc
