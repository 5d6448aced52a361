#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda.h"
#include "ops/cuda_kernel.cuh"
#include "ops/reduce_cuda.h"

namespace lc {
namespace internal {
namespace {

constexpr int kThreads = 256;
// A reduction whose outputs fill fewer blocks than this cuts each output's
// elements into slices (a second kernel adds the slices' results), ...
constexpr int64_t kTargetBlocks = 512;
// ... but never so thin that a thread adds fewer elements than this.
constexpr int64_t kMinPerThread = 64;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Where the elements of a reduction are: output m (row-major over the kept
// dims) reduces the elements r in [0, length) (row-major over the reduced
// dims) at x offset kept(m) + reduced(r). Slice s of every output covers
// r in [s * chunk, (s + 1) * chunk).
struct ReduceGeometry {
  int64_t outputs = 0;
  int64_t length = 0;
  int64_t chunk = 0;
  int64_t slices = 1;
  int group = 1;  // threads that reduce one output together: 1, 32 or 256
  cuda::StridedIndexer<1> kept;
  cuda::StridedIndexer<1> reduced;
};

// The geometry of reducing x over the dims d < x.dim() with mask[d]. The
// group and the slices depend only on the shapes and strides (never on the
// device), which keeps the summation order fixed.
ReduceGeometry MakeGeometry(const Tensor& x, const std::vector<bool>& mask) {
  Shape kept_sizes, kept_strides, reduced_sizes, reduced_strides;
  for (int64_t d = 0; d < x.dim(); ++d) {
    (mask[d] ? reduced_sizes : kept_sizes).push_back(x.size(d));
    (mask[d] ? reduced_strides : kept_strides).push_back(x.stride(d));
  }
  ReduceGeometry g;
  g.outputs = NumElements(kept_sizes);
  g.length = NumElements(reduced_sizes);
  const Shape* kept[1] = {&kept_strides};
  const Shape* reduced[1] = {&reduced_strides};
  g.kept = cuda::MakeCoalescedIndexer<1>(kept_sizes, kept);
  g.reduced = cuda::MakeCoalescedIndexer<1>(reduced_sizes, reduced);
  // A group of threads walks an output's elements together where they are
  // adjacent in memory (coalesced loads) or where there are fewer outputs
  // than a warp; otherwise each thread reduces one output, neighboring
  // threads reading neighboring outputs (coalesced again), and slices supply
  // the parallelism when the outputs are few.
  const bool adjacent =
      g.reduced.rank > 0 && g.reduced.strides[0][g.reduced.rank - 1] == 1;
  if (g.length >= 32 && (adjacent || g.outputs < 32)) {
    g.group = g.length >= 4096 ? kThreads : 32;
  }
  const int64_t blocks = CeilDiv(g.outputs, kThreads / g.group);
  if (g.length > 0 && blocks < kTargetBlocks) {
    g.slices = std::max<int64_t>(
        1, std::min(CeilDiv(kTargetBlocks, std::max<int64_t>(blocks, 1)),
                    g.length / (g.group * kMinPerThread)));
  }
  g.chunk = CeilDiv(g.length, g.slices);
  if (g.chunk > 0) g.slices = CeilDiv(g.length, g.chunk);
  return g;
}

// Sum times scale, accumulated in the compute type.
template <typename T>
struct SumOp {
  using C = cuda::compute_t<T>;
  using Acc = C;
  T* out;
  C scale;
  __device__ Acc Init() const { return Acc(0); }
  __device__ Acc Add(Acc acc, C v, int64_t) const { return acc + v; }
  __device__ Acc Combine(Acc a, Acc b) const { return a + b; }
  __device__ void Write(int64_t m, Acc acc) const {
    cuda::Store(out + m, acc * scale);
  }
};

// The maximum and the index of its first occurrence, NaN above everything:
// Combine picks the same element as the CPU's left-to-right scan in any
// grouping, since it is the maximum of a total order.
template <typename T>
struct MaxOp {
  using C = cuda::compute_t<T>;
  struct Acc {
    C value;
    int64_t index;  // -1: no element yet
  };
  T* out;
  int64_t* argmax;
  __device__ Acc Init() const { return Acc{C(0), -1}; }
  __device__ Acc Add(Acc acc, C v, int64_t r) const {
    return Combine(acc, Acc{v, r});
  }
  __device__ Acc Combine(Acc a, Acc b) const {
    if (a.index < 0) return b;
    if (b.index < 0) return a;
    const bool a_nan = a.value != a.value, b_nan = b.value != b.value;
    if (a_nan != b_nan) return a_nan ? a : b;
    if (!a_nan && a.value != b.value) return a.value > b.value ? a : b;
    return a.index < b.index ? a : b;
  }
  __device__ void Write(int64_t m, Acc acc) const {
    cuda::Store(out + m, acc.value);
    argmax[m] = acc.index;
  }
};

// The values `acc` of each kGroup consecutive threads of the block (lane =
// threadIdx.x % kGroup) combined in a fixed tree in `shared` (blockDim.x
// Accs), returned to every thread of the group. Every thread of the block
// must call it (it holds __syncthreads).
template <int kGroup, typename Op>
__device__ typename Op::Acc GroupCombine(const Op& op, typename Op::Acc acc,
                                         typename Op::Acc* shared) {
  const int lane = threadIdx.x % kGroup;
  shared[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int width = kGroup / 2; width > 0; width >>= 1) {
    if (lane < width) {
      shared[threadIdx.x] =
          op.Combine(shared[threadIdx.x], shared[threadIdx.x + width]);
    }
    __syncthreads();
  }
  acc = shared[threadIdx.x - lane];
  __syncthreads();  // The caller's next values rewrite `shared`.
  return acc;
}

// Reduces x (any strides, geometry g) with op: thread `lane` of the group
// of kGroup threads of output m adds the elements r = lane, lane + kGroup,
// ... of slice blockIdx.y in order; the group's results are combined in a
// fixed tree in shared memory. With one slice, op writes output m; else the
// result goes to partial[slice * outputs + m].
template <typename T, typename Op, int kGroup>
__global__ void __launch_bounds__(kThreads)
    ReduceKernel(const T* x, ReduceGeometry g, Op op,
                 typename Op::Acc* partial) {
  using Acc = typename Op::Acc;
  constexpr int kRows = kThreads / kGroup;
  __shared__ Acc shared[kGroup > 1 ? kThreads : 1];
  const int lane = threadIdx.x % kGroup;
  const int row = threadIdx.x / kGroup;
  const int64_t slice = blockIdx.y;
  const int64_t r_begin = slice * g.chunk;
  const int64_t r_end =
      r_begin + g.chunk < g.length ? r_begin + g.chunk : g.length;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kRows);
       first < g.outputs; first += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t m = first + row;
    Acc acc = op.Init();
    if (m < g.outputs) {
      int64_t base[1];
      g.kept.Offsets(m, base);
      for (int64_t r = r_begin + lane; r < r_end; r += kGroup) {
        int64_t offset[1];
        g.reduced.Offsets(r, offset);
        acc = op.Add(acc, cuda::Load(x + base[0] + offset[0]), r);
      }
    }
    if constexpr (kGroup > 1) acc = GroupCombine<kGroup>(op, acc, shared);
    if (lane == 0 && m < g.outputs) {
      if (gridDim.y == 1) {
        op.Write(m, acc);
      } else {
        partial[slice * g.outputs + m] = acc;
      }
    }
  }
}

// Combines the slices' results partial[s * outputs + m] and writes output m,
// for m in [0, outputs): 32 threads per output, thread `lane` combining the
// slices lane, lane + 32, ... in order, then the 32 results in a fixed tree
// in shared memory (so the order depends only on `slices`). Hundreds of
// slices over a few hundred outputs would leave one thread per output
// waiting on a long serial chain.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    ReduceSlicesKernel(const typename Op::Acc* partial, int64_t outputs,
                       int64_t slices, Op op) {
  using Acc = typename Op::Acc;
  constexpr int kGroup = 32, kRows = kThreads / kGroup;
  __shared__ Acc shared[kThreads];
  const int lane = threadIdx.x % kGroup;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kRows);
       first < outputs; first += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t m = first + threadIdx.x / kGroup;
    Acc acc = op.Init();
    if (m < outputs) {
      for (int64_t s = lane; s < slices; s += kGroup) {
        acc = s == lane ? partial[s * outputs + m]
                        : op.Combine(acc, partial[s * outputs + m]);
      }
    }
    acc = GroupCombine<kGroup>(op, acc, shared);
    if (lane == 0 && m < outputs) op.Write(m, acc);
  }
}

template <typename T, typename Op>
void LaunchReduce(const char* name, const T* x, const ReduceGeometry& g,
                  const Op& op, Device device) {
  if (g.outputs == 0) return;
  using Acc = typename Op::Acc;
  const cudaStream_t stream = cuda::LaunchStream(device);
  const dim3 grid(static_cast<unsigned>(std::min(
                      CeilDiv(g.outputs, kThreads / g.group), kMaxBlocks)),
                  static_cast<unsigned>(g.slices));
  // Freed at return; the caching allocator reuses it on this stream only
  // after the kernels below.
  Tensor workspace;
  Acc* partial = nullptr;
  if (g.slices > 1) {
    workspace =
        Empty({g.slices * g.outputs * static_cast<int64_t>(sizeof(Acc))},
              DType::kUInt8, device);
    partial = static_cast<Acc*>(workspace.raw_data());
  }
  switch (g.group) {
    case 1:
      ReduceKernel<T, Op, 1><<<grid, kThreads, 0, stream>>>(x, g, op, partial);
      break;
    case 32:
      ReduceKernel<T, Op, 32><<<grid, kThreads, 0, stream>>>(x, g, op, partial);
      break;
    default:
      LC_CHECK_EQ(g.group, kThreads);
      ReduceKernel<T, Op, kThreads>
          <<<grid, kThreads, 0, stream>>>(x, g, op, partial);
  }
  LC_CUDA_CHECK_LAUNCH(name);
  if (g.slices > 1) {
    ReduceSlicesKernel<Op>
        <<<cuda::GridFor(g.outputs, kThreads / 32), kThreads, 0, stream>>>(
            partial, g.outputs, g.slices, op);
    LC_CUDA_CHECK_LAUNCH(name);
  }
}

// gx[i] = g_keep[m] if argmax[m] == r else 0, for every row-major index i of
// gx's shape (n elements), r its index along the max dim (`length` long,
// `inner` elements apart) and m its line; g_keep is read through `g_index`
// (row-major over the lines).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    MaxBackwardKernel(const T* g_keep, cuda::StridedIndexer<1> g_index,
                      const int64_t* argmax, T* gx, int64_t n, int64_t length,
                      int64_t inner) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = (i / inner) % length;
    const int64_t m = i / (inner * length) * inner + i % inner;
    cuda::compute_t<T> v = 0;
    if (argmax[m] == r) {
      int64_t offset[1];
      g_index.Offsets(m, offset);
      v = cuda::Load(g_keep + offset[0]);
    }
    cuda::Store(gx + i, v);
  }
}

}  // namespace

void SumCuda(const Tensor& x, const std::vector<bool>& mask, double scale,
             const Tensor& out) {
  const ReduceGeometry g = MakeGeometry(x, mask);
  LC_CUDA_DISPATCH_FLOATING(x.dtype(), "Sum", [&] {
    const SumOp<scalar_t> op{static_cast<scalar_t*>(out.raw_data()),
                             static_cast<cuda::compute_t<scalar_t>>(scale)};
    LaunchReduce("Sum", static_cast<const scalar_t*>(x.raw_data()), g, op,
                 x.device());
  });
}

void MaxCuda(const Tensor& x, int64_t d, const Tensor& out,
             const Tensor& argmax) {
  std::vector<bool> mask(x.dim(), false);
  if (x.dim() > 0) mask[d] = true;
  const ReduceGeometry g = MakeGeometry(x, mask);
  LC_CUDA_DISPATCH_FLOATING(x.dtype(), "Max", [&] {
    const MaxOp<scalar_t> op{static_cast<scalar_t*>(out.raw_data()),
                             argmax.data<int64_t>()};
    LaunchReduce("Max", static_cast<const scalar_t*>(x.raw_data()), g, op,
                 x.device());
  });
}

void MaxBackwardCuda(const Tensor& g_keep, const Tensor& argmax, int64_t d,
                     const Tensor& gx) {
  const int64_t n = gx.numel();
  if (n == 0) return;
  const int64_t length = gx.dim() == 0 ? 1 : gx.size(d);
  int64_t inner = 1;
  for (int64_t k = d + 1; k < gx.dim(); ++k) inner *= gx.size(k);
  const Shape* g_strides[1] = {&g_keep.strides()};
  const auto g_index = cuda::MakeCoalescedIndexer<1>(g_keep.shape(), g_strides);
  const cudaStream_t stream = cuda::LaunchStream(gx.device());
  LC_CUDA_DISPATCH_FLOATING(gx.dtype(), "Max", [&] {
    MaxBackwardKernel<<<cuda::GridFor(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(g_keep.raw_data()), g_index,
        argmax.data<int64_t>(), static_cast<scalar_t*>(gx.raw_data()), n,
        length, inner);
    LC_CUDA_CHECK_LAUNCH("Max backward");
  });
}

}  // namespace internal
}  // namespace lc
