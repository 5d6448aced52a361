#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/cuda.h"
#include "ops/cuda_kernel.cuh"
#include "ops/softmax_cuda.h"

namespace lc {
namespace internal {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// The lines along a dim of N operands of one shape: line m (row-major over
// the other dims) starts at starts' offset of m in each operand, whose
// elements along the line are step[k] apart.
template <int N>
struct Lines {
  int64_t count;
  int64_t length;
  int64_t step[N];
  cuda::StridedIndexer<N> starts;
};

template <int N>
Lines<N> MakeLines(const Shape& shape, int64_t d,
                   const Shape* const (&strides)[N]) {
  Lines<N> lines;
  Shape starts_shape = shape;
  lines.length = 1;
  for (int k = 0; k < N; ++k) lines.step[k] = 0;
  if (!shape.empty()) {
    lines.length = shape[d];
    starts_shape[d] = 1;
    for (int k = 0; k < N; ++k) lines.step[k] = (*strides[k])[d];
  }
  lines.count = NumElements(starts_shape);
  lines.starts = cuda::MakeCoalescedIndexer<N>(starts_shape, strides);
  return lines;
}

// Threads per line: a warp or a block along lines whose elements are
// adjacent in the (contiguous) output, or when there are too few lines to
// give every thread one; otherwise one thread per line, neighboring threads
// on neighboring lines.
int LineGroup(const Shape& shape, int64_t d, int64_t count, int64_t length) {
  int64_t inner = 1;
  for (size_t k = d + 1; k < shape.size(); ++k) inner *= shape[k];
  if (length < 16 || (inner > 1 && count >= 2048)) return 1;
  return length >= 2048 ? kThreads : 32;
}

// Calls launch(std::integral_constant<int, G>()) for G = group.
template <typename Launch>
void WithGroup(int group, const Launch& launch) {
  switch (group) {
    case 1:
      return launch(std::integral_constant<int, 1>());
    case 32:
      return launch(std::integral_constant<int, 32>());
    default:
      LC_CHECK_EQ(group, kThreads);
      return launch(std::integral_constant<int, kThreads>());
  }
}

// Sum and max over the kGroup threads of a line (one thread, a warp, or the
// block); every thread of the group gets the result. `shared` holds 32
// values.
template <int kGroup, typename C>
__device__ __forceinline__ C GroupSum(C v, C* shared) {
  if constexpr (kGroup == 1) {
    return v;
  } else if constexpr (kGroup == 32) {
    return cuda::WarpSum(v);
  } else {
    return cuda::BlockSum(v, shared);
  }
}

template <int kGroup, typename C>
__device__ __forceinline__ C GroupMax(C v, C* shared) {
  if constexpr (kGroup == 1) {
    return v;
  } else if constexpr (kGroup == 32) {
    return cuda::WarpMax(v);
  } else {
    return cuda::BlockMax(v, shared, static_cast<C>(-INFINITY));
  }
}

// Softmax (or log-softmax) of every line of x into y; operand 0 of `lines`
// is x (any strides), operand 1 is y. kGroup threads per line; a block
// handles kThreads / kGroup lines at a time. The max ignores NaN, like the
// CPU's std::max (a NaN still makes its line NaN through the sum).
template <typename T, bool kLog, int kGroup>
__global__ void __launch_bounds__(kThreads)
    SoftmaxForwardKernel(const T* x, T* y, Lines<2> lines) {
  using C = cuda::compute_t<T>;
  __shared__ C shared[32];
  constexpr int kRows = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int row = threadIdx.x / kGroup;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kRows);
       first < lines.count; first += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t m = first + row;
    int64_t start[2] = {0, 0};
    const int64_t length = m < lines.count ? lines.length : 0;
    if (m < lines.count) lines.starts.Offsets(m, start);
    const T* xl = x + start[0];
    T* yl = y + start[1];
    const int64_t x_step = lines.step[0], y_step = lines.step[1];
    C max = static_cast<C>(-INFINITY);
    for (int64_t k = lane; k < length; k += kGroup) {
      const C v = cuda::Load(xl + k * x_step);
      max = v > max ? v : max;
    }
    max = GroupMax<kGroup>(max, shared);
    C sum = 0;
    for (int64_t k = lane; k < length; k += kGroup) {
      sum += std::exp(cuda::Load(xl + k * x_step) - max);
    }
    sum = GroupSum<kGroup>(sum, shared);
    if constexpr (kLog) {
      const C log_sum = std::log(sum);
      for (int64_t k = lane; k < length; k += kGroup) {
        cuda::Store(yl + k * y_step,
                    (cuda::Load(xl + k * x_step) - max) - log_sum);
      }
    } else {
      const C inv_sum = 1 / sum;
      for (int64_t k = lane; k < length; k += kGroup) {
        cuda::Store(yl + k * y_step,
                    std::exp(cuda::Load(xl + k * x_step) - max) * inv_sum);
      }
    }
  }
}

// The gradient of SoftmaxForwardKernel for every line; operands of `lines`:
// 0 = g (the output gradient), 1 = y (the forward's output), 2 = gx.
template <typename T, bool kLog, int kGroup>
__global__ void __launch_bounds__(kThreads)
    SoftmaxBackwardKernel(const T* g, const T* y, T* gx, Lines<3> lines) {
  using C = cuda::compute_t<T>;
  __shared__ C shared[32];
  constexpr int kRows = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int row = threadIdx.x / kGroup;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kRows);
       first < lines.count; first += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t m = first + row;
    int64_t start[3] = {0, 0, 0};
    const int64_t length = m < lines.count ? lines.length : 0;
    if (m < lines.count) lines.starts.Offsets(m, start);
    const T* gl = g + start[0];
    const T* yl = y + start[1];
    T* gxl = gx + start[2];
    const int64_t g_step = lines.step[0], y_step = lines.step[1],
                  gx_step = lines.step[2];
    C dot = 0;
    for (int64_t k = lane; k < length; k += kGroup) {
      const C gk = cuda::Load(gl + k * g_step);
      dot += kLog ? gk : gk * cuda::Load(yl + k * y_step);
    }
    dot = GroupSum<kGroup>(dot, shared);
    for (int64_t k = lane; k < length; k += kGroup) {
      const C gk = cuda::Load(gl + k * g_step);
      const C yk = cuda::Load(yl + k * y_step);
      cuda::Store(gxl + k * gx_step,
                  kLog ? gk - std::exp(yk) * dot : yk * (gk - dot));
    }
  }
}

unsigned BlocksFor(int64_t count, int group) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min((count + kThreads / group - 1) / (kThreads / group),
                  kMaxBlocks)));
}

}  // namespace

void SoftmaxForwardCuda(const Tensor& x, int64_t d, bool log, const Tensor& y) {
  const Shape* strides[2] = {&x.strides(), &y.strides()};
  const Lines<2> lines = MakeLines<2>(x.shape(), d, strides);
  if (lines.count == 0 || lines.length == 0) return;
  const int group = LineGroup(x.shape(), d, lines.count, lines.length);
  const cudaStream_t stream = cuda::LaunchStream(x.device());
  const char* op = log ? "LogSoftmax" : "Softmax";
  LC_CUDA_DISPATCH_FLOATING(x.dtype(), op, [&] {
    const auto* in = static_cast<const scalar_t*>(x.raw_data());
    auto* out = static_cast<scalar_t*>(y.raw_data());
    WithGroup(group, [&](auto group_constant) {
      constexpr int kGroup = decltype(group_constant)::value;
      const unsigned blocks = BlocksFor(lines.count, kGroup);
      if (log) {
        SoftmaxForwardKernel<scalar_t, true, kGroup>
            <<<blocks, kThreads, 0, stream>>>(in, out, lines);
      } else {
        SoftmaxForwardKernel<scalar_t, false, kGroup>
            <<<blocks, kThreads, 0, stream>>>(in, out, lines);
      }
    });
    LC_CUDA_CHECK_LAUNCH(op);
  });
}

void SoftmaxBackwardCuda(const Tensor& g, const Tensor& y, int64_t d, bool log,
                         const Tensor& gx) {
  const Shape* strides[3] = {&g.strides(), &y.strides(), &gx.strides()};
  const Lines<3> lines = MakeLines<3>(y.shape(), d, strides);
  if (lines.count == 0 || lines.length == 0) return;
  const int group = LineGroup(y.shape(), d, lines.count, lines.length);
  const cudaStream_t stream = cuda::LaunchStream(y.device());
  const char* op = log ? "LogSoftmax backward" : "Softmax backward";
  LC_CUDA_DISPATCH_FLOATING(y.dtype(), op, [&] {
    const auto* g_data = static_cast<const scalar_t*>(g.raw_data());
    const auto* y_data = static_cast<const scalar_t*>(y.raw_data());
    auto* gx_data = static_cast<scalar_t*>(gx.raw_data());
    WithGroup(group, [&](auto group_constant) {
      constexpr int kGroup = decltype(group_constant)::value;
      const unsigned blocks = BlocksFor(lines.count, kGroup);
      if (log) {
        SoftmaxBackwardKernel<scalar_t, true, kGroup>
            <<<blocks, kThreads, 0, stream>>>(g_data, y_data, gx_data, lines);
      } else {
        SoftmaxBackwardKernel<scalar_t, false, kGroup>
            <<<blocks, kThreads, 0, stream>>>(g_data, y_data, gx_data, lines);
      }
    });
    LC_CUDA_CHECK_LAUNCH(op);
  });
}

}  // namespace internal
}  // namespace lc
