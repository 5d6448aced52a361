#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
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

// One thread per (row (b, t), i < half) of x [batch, n, heads, head_dim]
// (element strides xs) and of dense out of that shape, half = head_dim / 2:
// the thread computes cos and sign * sin of angle = positions[t * pos_stride]
// * base^(-2i / head_dim) in float64 once and rotates pair i of every head h,
// with (lo, hi) = (x[b, t, h, i], x[b, t, h, i + half]):
//   out[b, t, h, i] = lo * cos - hi * sin,
//   out[b, t, h, i + half] = hi * cos + lo * sin.
// The block first puts base^(-2i / head_dim) for every i into shared memory
// (half doubles): the float64 pow once per block, the sincos once per
// (row, i), and memory traffic dominates.
template <typename T, typename A = compute_t<T>>
__global__ void __launch_bounds__(kThreads)
    RotaryKernel(const T* x, Strides4 xs, const int64_t* positions,
                 int64_t pos_stride, int64_t batch, int64_t n, int64_t heads,
                 int64_t head_dim, double base, double sign, T* out) {
  extern __shared__ __align__(16) unsigned char table_bytes[];
  double* inv_freq = reinterpret_cast<double*>(table_bytes);  // [half]
  const int64_t half = head_dim / 2;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    inv_freq[i] = pow(base, -2.0 * static_cast<double>(i) / head_dim);
  }
  __syncthreads();
  const int64_t items = batch * n * half;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       e < items; e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / half;
    const int64_t i = e - row * half;
    const int64_t b = row / n;
    const int64_t t = row - b * n;
    double s, c;
    sincos(static_cast<double>(positions[t * pos_stride]) * inv_freq[i], &s,
           &c);
    const A cos_a = static_cast<A>(c), sin_a = static_cast<A>(sign * s);
    const T* xr = x + b * xs.s[0] + t * xs.s[1] + i * xs.s[3];
    T* outr = out + row * heads * head_dim + i;
    for (int64_t h = 0; h < heads; ++h) {
      const A lo = Load(xr + h * xs.s[2]);
      const A hi = Load(xr + h * xs.s[2] + half * xs.s[3]);
      Store(outr + h * head_dim, lo * cos_a - hi * sin_a);
      Store(outr + h * head_dim + half, hi * cos_a + lo * sin_a);
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
    // Enough blocks to fill the GPU a few times over; each computes the
    // frequency table once.
    const int64_t items = rows * (x.size(3) / 2);
    const unsigned blocks =
        std::min<unsigned>(cuda::GridFor(items, kThreads), 8192);
    const size_t shared_bytes =
        static_cast<size_t>(x.size(3) / 2) * sizeof(double);
    RotaryKernel<scalar_t><<<blocks, kThreads, shared_bytes, stream>>>(
        static_cast<const scalar_t*>(x.raw_data()), xs,
        static_cast<const int64_t*>(positions.raw_data()), positions.stride(0),
        x.size(0), x.size(1), x.size(2), x.size(3), base, sign,
        static_cast<scalar_t*>(out.raw_data()));
    LC_CUDA_CHECK_LAUNCH("RotaryKernel");
  });
}

}  // namespace internal
}  // namespace lc
