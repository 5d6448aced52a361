#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda.h"
#include "core/status.h"
#include "ops/cuda_kernel.cuh"
#include "ops/rope_cuda.h"

namespace lc {
namespace internal {
namespace {

using cuda::compute_t;
using cuda::Load;
using cuda::Store;

constexpr int kThreads = 128;

// Element strides of a 4-D tensor, passed to the kernel by value.
struct Strides4 {
  int64_t s[4];
};

// One block per row (b, t) of x [batch, n, heads, head_dim] (element strides
// xs) and of dense out of that shape, with half = head_dim / 2: the block
// first puts cos and sign * sin of angle[i] = positions[t * pos_stride] *
// base^(-2i / head_dim), i < half, computed in float64, into shared memory
// (2 * half values of A), then for every head h and i < half, with
// (lo, hi) = (x[b, t, h, i], x[b, t, h, i + half]):
//   out[b, t, h, i] = lo * cos - hi * sin,
//   out[b, t, h, i + half] = hi * cos + lo * sin.
template <typename T, typename A = compute_t<T>>
__global__ void __launch_bounds__(kThreads)
    RotaryKernel(const T* x, Strides4 xs, const int64_t* positions,
                 int64_t pos_stride, int64_t batch, int64_t n, int64_t heads,
                 int64_t head_dim, double base, double sign, T* out) {
  extern __shared__ __align__(16) unsigned char table_bytes[];
  A* cos_table = reinterpret_cast<A*>(table_bytes);
  const int64_t half = head_dim / 2;
  A* sin_table = cos_table + half;
  for (int64_t row = blockIdx.x; row < batch * n; row += gridDim.x) {
    const int64_t b = row / n;
    const int64_t t = row - b * n;
    const double position = static_cast<double>(positions[t * pos_stride]);
    __syncthreads();  // The previous row's threads are done with the table.
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      const double angle =
          position * pow(base, -2.0 * static_cast<double>(i) / head_dim);
      double s, c;
      sincos(angle, &s, &c);
      cos_table[i] = static_cast<A>(c);
      sin_table[i] = static_cast<A>(sign * s);
    }
    __syncthreads();
    const T* xr = x + b * xs.s[0] + t * xs.s[1];
    T* outr = out + row * heads * head_dim;
    for (int64_t p = threadIdx.x; p < heads * half; p += blockDim.x) {
      const int64_t h = p / half;
      const int64_t i = p - h * half;
      const T* xv = xr + h * xs.s[2];
      const A lo = Load(xv + i * xs.s[3]);
      const A hi = Load(xv + (i + half) * xs.s[3]);
      T* ov = outr + h * head_dim;
      Store(ov + i, lo * cos_table[i] - hi * sin_table[i]);
      Store(ov + i + half, hi * cos_table[i] + lo * sin_table[i]);
    }
  }
}

}  // namespace

void RotaryCuda(const Tensor& x, const Tensor& positions, double base,
                double sign, const Tensor& out) {
  LC_CHECK_LE(x.size(3), kMaxRotaryHeadDimCuda);
  const int64_t rows = x.size(0) * x.size(1);
  if (out.numel() == 0) return;
  const cudaStream_t stream = cuda::LaunchStream(x.device());
  Strides4 xs;
  for (int d = 0; d < 4; ++d) xs.s[d] = x.stride(d);
  LC_CUDA_DISPATCH_FLOATING(x.dtype(), "ApplyRotary", [&] {
    using A = compute_t<scalar_t>;
    const size_t shared_bytes = static_cast<size_t>(x.size(3)) * sizeof(A);
    RotaryKernel<scalar_t>
        <<<cuda::GridFor(rows, 1), kThreads, shared_bytes, stream>>>(
            static_cast<const scalar_t*>(x.raw_data()), xs,
            static_cast<const int64_t*>(positions.raw_data()),
            positions.stride(0), x.size(0), x.size(1), x.size(2), x.size(3),
            base, sign, static_cast<scalar_t*>(out.raw_data()));
    LC_CUDA_CHECK_LAUNCH("RotaryKernel");
  });
}

}  // namespace internal
}  // namespace lc
