#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda.h"
#include "ops/cuda_kernel.cuh"
#include "ops/loss_cuda.h"

namespace lc {
namespace internal {
namespace {

using cuda::compute_t;
using cuda::Load;
using cuda::Store;

constexpr int kThreads = 256;
constexpr int kReduceThreads = 1024;

// One block per row i of dense logits [rows, classes], in A (float64 for
// float64, float32 otherwise):
//   lse[i] = max_c + log(sum_c exp(logits[i, c] - max_c)),
//   row_loss[i] = lse[i] - logits[i, target[i]], or 0 when target[i] ==
//   ignore_index
// (lse, row_loss, target [rows]).
template <typename T, typename A = compute_t<T>>
__global__ void CrossEntropyRowKernel(const T* logits, const int64_t* target,
                                      int64_t rows, int64_t classes,
                                      int64_t ignore_index, A* lse,
                                      A* row_loss) {
  __shared__ A shared[32];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const T* row = logits + i * classes;
    A row_max = -INFINITY;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
      const A v = Load(row + c);
      row_max = v > row_max ? v : row_max;
    }
    row_max = cuda::BlockMax(row_max, shared, A(-INFINITY));
    A sum = 0;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
      sum += exp(Load(row + c) - row_max);
    }
    const A row_lse = row_max + log(cuda::BlockSum(sum, shared));
    if (threadIdx.x == 0) {
      lse[i] = row_lse;
      const int64_t t = target[i];
      row_loss[i] = t == ignore_index ? A(0) : row_lse - Load(row + t);
    }
  }
}

// One block of kReduceThreads threads:
//   count[0] = the number of i < rows with target[i] != ignore_index,
//   loss[0] = sum_i row_loss[i], divided by count[0] when `mean` (0 when
//             count[0] = 0),
// thread t adding i = t, t + kReduceThreads, ... in order, then BlockSum.
template <typename T, typename A = compute_t<T>>
__global__ void __launch_bounds__(kReduceThreads)
    CrossEntropyReduceKernel(const A* row_loss, const int64_t* target,
                             int64_t rows, int64_t ignore_index, bool mean,
                             T* loss, int64_t* count) {
  __shared__ A shared[32];
  __shared__ long long shared_count[32];
  A sum = 0;
  long long n = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    sum += row_loss[i];
    n += target[i] != ignore_index ? 1 : 0;
  }
  sum = cuda::BlockSum(sum, shared);
  n = cuda::BlockSum(n, shared_count);
  if (threadIdx.x == 0) {
    count[0] = n;
    // Ignored rows' row_loss is 0: with every row ignored the sum is 0.
    Store(loss, mean ? (n > 0 ? sum / static_cast<A>(n) : A(0)) : sum);
  }
}

// dlogits[i, c] = s * (exp(logits[i, c] - lse[i]) - [c == target[i]])
// for rows with target[i] != ignore_index, 0 for the others, where s = g /
// count when `mean` (0 when count is 0) and s = g otherwise; logits, dlogits
// dense [rows, classes], lse [rows] in A, g a scalar and count int64 [1].
template <typename T, typename A = compute_t<T>>
__global__ void CrossEntropyBackwardKernel(const T* logits,
                                           const int64_t* target, const A* lse,
                                           const int64_t* count, const T* g,
                                           int64_t rows, int64_t classes,
                                           int64_t ignore_index, bool mean,
                                           T* dlogits) {
  const int64_t n = count[0];
  const A scale = mean ? (n > 0 ? Load(g) / static_cast<A>(n) : A(0)) : Load(g);
  const int64_t total = rows * classes;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       j < total; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = j / classes;
    const int64_t t = target[i];
    if (t == ignore_index) {
      Store(dlogits + j, A(0));
      continue;
    }
    const A p = exp(Load(logits + j) - lse[i]);
    Store(dlogits + j, scale * (p - (j - i * classes == t ? A(1) : A(0))));
  }
}

}  // namespace

void CrossEntropyForwardCuda(const Tensor& logits, const Tensor& targets,
                             int64_t ignore_index, bool mean, const Tensor& lse,
                             const Tensor& count, const Tensor& loss) {
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  const cudaStream_t stream = cuda::LaunchStream(logits.device());
  const int64_t* target = static_cast<const int64_t*>(targets.raw_data());
  LC_CUDA_DISPATCH_FLOATING(logits.dtype(), "CrossEntropy", [&] {
    using A = compute_t<scalar_t>;
    const Tensor row_loss =
        Empty({rows}, ComputeDType(logits.dtype()), logits.device());
    if (rows > 0) {
      CrossEntropyRowKernel<scalar_t>
          <<<cuda::GridFor(rows, 1), cuda::RowThreads(classes), 0, stream>>>(
              static_cast<const scalar_t*>(logits.raw_data()), target, rows,
              classes, ignore_index, static_cast<A*>(lse.raw_data()),
              static_cast<A*>(row_loss.raw_data()));
      LC_CUDA_CHECK_LAUNCH("CrossEntropyRowKernel");
    }
    CrossEntropyReduceKernel<scalar_t><<<1, kReduceThreads, 0, stream>>>(
        static_cast<const A*>(row_loss.raw_data()), target, rows, ignore_index,
        mean, static_cast<scalar_t*>(loss.raw_data()),
        static_cast<int64_t*>(count.raw_data()));
    LC_CUDA_CHECK_LAUNCH("CrossEntropyReduceKernel");
  });
}

void CrossEntropyBackwardCuda(const Tensor& logits, const Tensor& targets,
                              int64_t ignore_index, bool mean,
                              const Tensor& lse, const Tensor& count,
                              const Tensor& g, const Tensor& dlogits) {
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  if (rows == 0) return;
  const cudaStream_t stream = cuda::LaunchStream(logits.device());
  LC_CUDA_DISPATCH_FLOATING(logits.dtype(), "CrossEntropy", [&] {
    using A = compute_t<scalar_t>;
    CrossEntropyBackwardKernel<scalar_t>
        <<<cuda::GridFor(rows * classes, kThreads), kThreads, 0, stream>>>(
            static_cast<const scalar_t*>(logits.raw_data()),
            static_cast<const int64_t*>(targets.raw_data()),
            static_cast<const A*>(lse.raw_data()),
            static_cast<const int64_t*>(count.raw_data()),
            static_cast<const scalar_t*>(g.raw_data()), rows, classes,
            ignore_index, mean, static_cast<scalar_t*>(dlogits.raw_data()));
    LC_CUDA_CHECK_LAUNCH("CrossEntropyBackwardKernel");
  });
}

}  // namespace internal
}  // namespace lc
