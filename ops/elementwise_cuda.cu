#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "core/cuda.h"
#include "ops/cuda_kernel.cuh"
#include "ops/elementwise_cuda.h"
#include "ops/elementwise_functors.h"

namespace lc {
namespace internal {
namespace {

constexpr int kThreads = 256;

// The N input buffers of a map, passed to kernels by value. Input k is
// dense over the map's n elements (period[k] == 0) or one row of period[k]
// elements repeated along the leading dims (a broadcast bias, say): element
// i of the map reads p[k][i % period[k]].
template <typename T, size_t N>
struct InputPointers {
  const T* p[N];
  int64_t period[N];

  __device__ __forceinline__ int64_t Index(size_t k, int64_t i) const {
    return period[k] == 0 ? i : i % period[k];
  }
};

// W consecutive elements, loaded and stored as one aligned access.
template <typename T, int W>
struct alignas(sizeof(T) * W) Packet {
  T v[W];
};

// out[i] = fn(in[0][i], ..., in[N-1][i]) for i in [0, n), out dense of n
// elements, the inputs dense or repeated rows (InputPointers). W elements per
// thread and step (16-byte packets when W > 1; then every buffer is 16-byte
// aligned and every period a multiple of W, so a packet never straddles a
// repeated row); the n % W tail one by one.
template <typename T, int W, size_t N, typename Fn, size_t... K>
__global__ void __launch_bounds__(kThreads)
    MapDenseKernel(InputPointers<T, N> in, T* out, int64_t n, Fn fn,
                   std::index_sequence<K...>) {
  const int64_t first =
      blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packets = n / W;
  for (int64_t v = first; v < packets; v += step) {
    Packet<T, W> loaded[N];
#pragma unroll
    for (size_t k = 0; k < N; ++k) {
      loaded[k] = reinterpret_cast<const Packet<T, W>*>(
          in.p[k])[in.Index(k, v * W) / W];
    }
    Packet<T, W> result;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      cuda::Store(&result.v[j], fn(cuda::Load(&loaded[K].v[j])...));
    }
    reinterpret_cast<Packet<T, W>*>(out)[v] = result;
  }
  for (int64_t i = packets * W + first; i < n; i += step) {
    cuda::Store(out + i, fn(cuda::Load(in.p[K] + in.Index(K, i))...));
  }
}

// out[i] = fn(in[0][o_0], ..., in[N-1][o_{N-1}]) for every row-major index i
// of the indexer's shape (n elements), o_k = indexer's offset of operand k;
// out is dense of n elements.
template <typename T, size_t N, typename Fn, size_t... K>
__global__ void __launch_bounds__(kThreads)
    MapStridedKernel(InputPointers<T, N> in,
                     cuda::StridedIndexer<static_cast<int>(N)> indexer, T* out,
                     int64_t n, Fn fn, std::index_sequence<K...>) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t offsets[N];
    indexer.Offsets(i, offsets);
    cuda::Store(out + i, fn(cuda::Load(in.p[K] + offsets[K])...));
  }
}

bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The periods of InputPointers for a coalesced indexer, or false when an
// input is neither dense over the map nor a repeated row: rank <= 1 with
// unit strides (all dense), or rank 2 [rows, cols] with each input's strides
// (cols, 1) (dense) or (0, 1) (a row of cols elements, repeated).
template <int N>
bool RowPeriods(const cuda::StridedIndexer<N>& indexer, int64_t (&period)[N]) {
  for (int k = 0; k < N; ++k) period[k] = 0;
  if (cuda::IsUnitStride(indexer)) return true;
  if (indexer.rank != 2) return false;
  const int64_t cols = indexer.sizes[1];
  for (int k = 0; k < N; ++k) {
    if (indexer.strides[k][1] != 1) return false;
    if (indexer.strides[k][0] == 0) {
      period[k] = cols;
    } else if (indexer.strides[k][0] != cols) {
      return false;
    }
  }
  return true;
}

}  // namespace

template <size_t N, typename Fn>
void MapElementsCuda(const char* op, const Shape& shape,
                     const std::array<Shape, N>& strides,
                     const std::array<Tensor, N>& inputs, const Tensor& out,
                     const Fn& fn) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const cudaStream_t stream = cuda::LaunchStream(out.device());
  const Shape* stride_ptrs[N];
  for (size_t k = 0; k < N; ++k) stride_ptrs[k] = &strides[k];
  const auto indexer =
      cuda::MakeCoalescedIndexer<static_cast<int>(N)>(shape, stride_ptrs);
  const auto seq = std::make_index_sequence<N>();
  LC_CUDA_DISPATCH_FLOATING(out.dtype(), op, [&] {
    constexpr int kWidth = 16 / sizeof(scalar_t);
    InputPointers<scalar_t, N> in;
    const bool dense = RowPeriods(indexer, in.period);
    bool packets = Aligned16(out.raw_data());
    for (size_t k = 0; k < N; ++k) {
      in.p[k] = static_cast<const scalar_t*>(inputs[k].raw_data());
      packets = packets && Aligned16(in.p[k]) && in.period[k] % kWidth == 0;
    }
    scalar_t* out_data = static_cast<scalar_t*>(out.raw_data());
    if (dense && packets) {
      MapDenseKernel<scalar_t, kWidth>
          <<<cuda::GridFor(n / kWidth + 1, kThreads), kThreads, 0, stream>>>(
              in, out_data, n, fn, seq);
    } else if (dense) {
      MapDenseKernel<scalar_t, 1>
          <<<cuda::GridFor(n, kThreads), kThreads, 0, stream>>>(in, out_data, n,
                                                                fn, seq);
    } else {
      MapStridedKernel<<<cuda::GridFor(n, kThreads), kThreads, 0, stream>>>(
          in, indexer, out_data, n, fn, seq);
    }
    LC_CUDA_CHECK_LAUNCH(op);
  });
}

// Every functor an op maps on CUDA, by arity.
#define LC_INSTANTIATE_MAP_ELEMENTS_CUDA(N, FN)               \
  template void MapElementsCuda<N, FN>(                       \
      const char*, const Shape&, const std::array<Shape, N>&, \
      const std::array<Tensor, N>&, const Tensor&, const FN&);

LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, AddScalarFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, MulScalarFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, PowScalarFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, NegFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, ExpFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, LogFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, SqrtFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, RsqrtFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, TanhFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, SquareFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, ReluFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, SiluFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, GeluErfFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(1, GeluTanhFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, AddFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, SubFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, MulFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, DivFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, PowScalarGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, SqrtGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, RsqrtGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, TanhGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, SquareGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, ReluGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, SiluGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, GeluErfGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(2, GeluTanhGradFn)
LC_INSTANTIATE_MAP_ELEMENTS_CUDA(3, DivGradBFn)

#undef LC_INSTANTIATE_MAP_ELEMENTS_CUDA

}  // namespace internal
}  // namespace lc
