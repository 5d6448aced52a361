#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda.h"
#include "ops/cuda_kernel.cuh"
#include "ops/norm_cuda.h"

namespace lc {
namespace internal {
namespace {

using cuda::compute_t;
using cuda::Load;
using cuda::Store;

// Threads per block of the row kernels: 8 warps, a row per warp.
constexpr int kRowThreads = 256;

// This warp's first row and the step to its next one.
__device__ __forceinline__ int64_t WarpRow() {
  return (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
}
__device__ __forceinline__ int64_t WarpRowStep() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
}

template <typename T>
const T* DataOrNull(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.raw_data()) : nullptr;
}
template <typename T>
T* MutableDataOrNull(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw_data()) : nullptr;
}

// Forward of LayerNorm (center) and RmsNorm (!center), one warp per row r of
// dense x [rows, dim], in A (float64 for float64, float32 otherwise):
//   mean[r] = mean_d x[r, d] (0 unless center),
//   rstd[r] = 1 / sqrt(mean_d (x[r, d] - mean[r])^2 + eps),
//   y[r, d] = (x[r, d] - mean[r]) * rstd[r] * w[d] + b[d]
// (w, b [dim] may be null: 1 and 0); y dense [rows, dim], mean, rstd [rows].
// A warp per row reduces with shuffles only: model widths are a few
// thousand elements at most, and a block per row would spend its time in
// __syncthreads.
template <typename T, typename A = compute_t<T>>
__global__ void __launch_bounds__(kRowThreads)
    NormForwardKernel(const T* x, const T* w, const T* b, int64_t rows,
                      int64_t dim, A eps, bool center, T* y, A* mean, A* rstd) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = WarpRow(); r < rows; r += WarpRowStep()) {
    const T* xr = x + r * dim;
    A mu = 0;
    if (center) {
      A sum = 0;
      for (int64_t d = lane; d < dim; d += 32) sum += Load(xr + d);
      mu = cuda::WarpSum(sum) / static_cast<A>(dim);
    }
    A sq = 0;
    for (int64_t d = lane; d < dim; d += 32) {
      const A c = Load(xr + d) - mu;
      sq += c * c;
    }
    const A rs = A(1) / sqrt(cuda::WarpSum(sq) / static_cast<A>(dim) + eps);
    T* yr = y + r * dim;
    for (int64_t d = lane; d < dim; d += 32) {
      A v = (Load(xr + d) - mu) * rs;
      if (w != nullptr) v *= Load(w + d);
      if (b != nullptr) v += Load(b + d);
      Store(yr + d, v);
    }
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// The input gradient of NormForwardKernel, one warp per row r: with
// xhat = (x[r, d] - mean[r]) * rstd[r] and gw = g[r, d] * w[d] (g where w is
// null),
//   dx[r, d] = rstd[r] * (gw - mean_d gw [if center] - xhat * mean_d(gw xhat))
// for dense x, g, dx [rows, dim].
template <typename T, typename A = compute_t<T>>
__global__ void __launch_bounds__(kRowThreads)
    NormBackwardKernel(const T* x, const T* w, const A* mean, const A* rstd,
                       const T* g, int64_t rows, int64_t dim, bool center,
                       T* dx) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = WarpRow(); r < rows; r += WarpRowStep()) {
    const T* xr = x + r * dim;
    const T* gr = g + r * dim;
    const A mu = mean[r];
    const A rs = rstd[r];
    A sum_gw = 0, sum_gw_xhat = 0;
    for (int64_t d = lane; d < dim; d += 32) {
      const A gw = w != nullptr ? Load(gr + d) * Load(w + d) : Load(gr + d);
      sum_gw += gw;
      sum_gw_xhat += gw * ((Load(xr + d) - mu) * rs);
    }
    const A mean_gw =
        center ? cuda::WarpSum(sum_gw) / static_cast<A>(dim) : A(0);
    const A mean_gw_xhat = cuda::WarpSum(sum_gw_xhat) / static_cast<A>(dim);
    T* dxr = dx + r * dim;
    for (int64_t d = lane; d < dim; d += 32) {
      const A gw = w != nullptr ? Load(gr + d) * Load(w + d) : Load(gr + d);
      const A xhat = (Load(xr + d) - mu) * rs;
      Store(dxr + d, rs * (gw - mean_gw - xhat * mean_gw_xhat));
    }
  }
}

constexpr int kTileCols = 32;
constexpr int kTileRows = 8;

// Partial weight and bias gradients over chunks of rows. Block (kTileCols,
// kTileRows) at (blockIdx.x, c = blockIdx.y) covers the columns d of tile
// blockIdx.x and the rows [c * chunk_rows, min(rows, (c + 1) * chunk_rows)):
//   dw_partial[c, d] = sum_r g[r, d] * (x[r, d] - mean[r]) * rstd[r],
//   db_partial[c, d] = sum_r g[r, d]
// ([chunks, dim] in A; each written when non-null). Thread (tx, ty) adds the
// chunk's rows ty, ty + kTileRows, ... in order; the kTileRows sums of a
// column are then added in order of ty.
template <typename T, typename A = compute_t<T>>
__global__ void NormParamGradPartialKernel(const T* x, const T* g,
                                           const A* mean, const A* rstd,
                                           int64_t rows, int64_t dim,
                                           int64_t chunk_rows, A* dw_partial,
                                           A* db_partial) {
  __shared__ A sum_w[kTileRows][kTileCols + 1];
  __shared__ A sum_b[kTileRows][kTileCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kTileCols + tx;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_rows;
  const int64_t end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  A acc_w = 0, acc_b = 0;
  if (d < dim) {
    for (int64_t r = begin + ty; r < end; r += kTileRows) {
      const A gv = Load(g + r * dim + d);
      acc_w += gv * ((Load(x + r * dim + d) - mean[r]) * rstd[r]);
      acc_b += gv;
    }
  }
  sum_w[ty][tx] = acc_w;
  sum_b[ty][tx] = acc_b;
  __syncthreads();
  if (ty != 0 || d >= dim) return;
  A total_w = 0, total_b = 0;
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    total_w += sum_w[i][tx];
    total_b += sum_b[i][tx];
  }
  if (dw_partial != nullptr) dw_partial[blockIdx.y * dim + d] = total_w;
  if (db_partial != nullptr) db_partial[blockIdx.y * dim + d] = total_b;
}

// dw[d] = sum_c dw_partial[c, d] and db[d] = sum_c db_partial[c, d] (each
// when non-null), for partials [chunks, dim] in A and dw, db [dim]: a warp
// per column d, lane l adding the chunks l, l + 32, ... in order, then the
// lanes' sums in a fixed shuffle tree (the order depends only on chunks).
template <typename T, typename A = compute_t<T>>
__global__ void __launch_bounds__(kRowThreads)
    NormParamGradFinalKernel(const A* dw_partial, const A* db_partial,
                             int64_t chunks, int64_t dim, T* dw, T* db) {
  const int lane = threadIdx.x % 32;
  for (int64_t d = WarpRow(); d < dim; d += WarpRowStep()) {
    A total_w = 0, total_b = 0;
    for (int64_t c = lane; c < chunks; c += 32) {
      if (dw != nullptr) total_w += dw_partial[c * dim + d];
      if (db != nullptr) total_b += db_partial[c * dim + d];
    }
    total_w = cuda::WarpSum(total_w);
    total_b = cuda::WarpSum(total_b);
    if (lane != 0) continue;
    if (dw != nullptr) Store(dw + d, total_w);
    if (db != nullptr) Store(db + d, total_b);
  }
}

}  // namespace

void NormForwardCuda(const Tensor& x, const Tensor& weight, const Tensor& bias,
                     double eps, bool center, const Tensor& y,
                     const Tensor& mean, const Tensor& rstd) {
  const int64_t dim = x.size(-1);
  const int64_t rows = x.numel() / dim;
  if (rows == 0) return;
  const cudaStream_t stream = cuda::LaunchStream(x.device());
  LC_CUDA_DISPATCH_FLOATING(x.dtype(), "NormForwardCuda", [&] {
    using A = compute_t<scalar_t>;
    NormForwardKernel<scalar_t>
        <<<cuda::GridFor(rows, kRowThreads / 32), kRowThreads, 0, stream>>>(
            static_cast<const scalar_t*>(x.raw_data()),
            DataOrNull<scalar_t>(weight), DataOrNull<scalar_t>(bias), rows, dim,
            static_cast<A>(eps), center, static_cast<scalar_t*>(y.raw_data()),
            static_cast<A*>(mean.raw_data()), static_cast<A*>(rstd.raw_data()));
    LC_CUDA_CHECK_LAUNCH("NormForwardKernel");
  });
}

void NormBackwardCuda(const Tensor& x, const Tensor& weight, const Tensor& mean,
                      const Tensor& rstd, const Tensor& g, bool center,
                      const Tensor& dx, const Tensor& dweight,
                      const Tensor& dbias) {
  const int64_t dim = x.size(-1);
  const int64_t rows = x.numel() / dim;
  const cudaStream_t stream = cuda::LaunchStream(x.device());
  LC_CUDA_DISPATCH_FLOATING(x.dtype(), "NormBackwardCuda", [&] {
    using A = compute_t<scalar_t>;
    const scalar_t* x_data = static_cast<const scalar_t*>(x.raw_data());
    const scalar_t* g_data = static_cast<const scalar_t*>(g.raw_data());
    const A* mean_data = static_cast<const A*>(mean.raw_data());
    const A* rstd_data = static_cast<const A*>(rstd.raw_data());
    if (rows > 0) {
      NormBackwardKernel<scalar_t>
          <<<cuda::GridFor(rows, kRowThreads / 32), kRowThreads, 0, stream>>>(
              x_data, DataOrNull<scalar_t>(weight), mean_data, rstd_data,
              g_data, rows, dim, center, static_cast<scalar_t*>(dx.raw_data()));
      LC_CUDA_CHECK_LAUNCH("NormBackwardKernel");
    }
    if (!dweight.defined() && !dbias.defined()) return;
    // Chunks of at least 64 rows, at most 256 chunks: a function of the
    // shape only, so the summation order is too.
    const int64_t chunk_rows = std::max<int64_t>(64, (rows + 255) / 256);
    const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    const DType partial_dtype = ComputeDType(x.dtype());
    const Tensor dw_partial =
        dweight.defined() ? Empty({chunks, dim}, partial_dtype, x.device())
                          : Tensor();
    const Tensor db_partial =
        dbias.defined() ? Empty({chunks, dim}, partial_dtype, x.device())
                        : Tensor();
    if (chunks > 0) {
      const dim3 grid(static_cast<unsigned>((dim + kTileCols - 1) / kTileCols),
                      static_cast<unsigned>(chunks));
      NormParamGradPartialKernel<scalar_t>
          <<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
              x_data, g_data, mean_data, rstd_data, rows, dim, chunk_rows,
              MutableDataOrNull<A>(dw_partial),
              MutableDataOrNull<A>(db_partial));
      LC_CUDA_CHECK_LAUNCH("NormParamGradPartialKernel");
    }
    NormParamGradFinalKernel<scalar_t>
        <<<cuda::GridFor(dim, kRowThreads / 32), kRowThreads, 0, stream>>>(
            DataOrNull<A>(dw_partial), DataOrNull<A>(db_partial), chunks, dim,
            MutableDataOrNull<scalar_t>(dweight),
            MutableDataOrNull<scalar_t>(dbias));
    LC_CUDA_CHECK_LAUNCH("NormParamGradFinalKernel");
  });
}

}  // namespace internal
}  // namespace lc
