// Building blocks shared by the CUDA kernels of ops/ (included only by .cu
// files): element loads and stores that compute bfloat16 in float32, a
// strided index-to-offset calculator (so kernels read non-contiguous views
// and broadcast inputs without copies), launch sizing, and warp/block
// reductions.
#ifndef LONGCTX_OPS_CUDA_KERNEL_CUH_
#define LONGCTX_OPS_CUDA_KERNEL_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/check.h"
#include "core/cuda.h"
#include "core/dtype.h"
#include "core/shape.h"
#include "core/status.h"

namespace lc {
namespace cuda {

// The type a kernel computes in for a storage type: float for bfloat16.
template <typename T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

template <typename T>
__device__ __forceinline__ compute_t<T> Load(const T* p) {
  return *p;
}
template <>
__device__ __forceinline__ float Load(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T>
__device__ __forceinline__ void Store(T* p, compute_t<T> v) {
  *p = v;
}
template <>
__device__ __forceinline__ void Store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// Up to kMaxDims dims of sizes and per-operand strides (in elements), passed
// to kernels by value. Offset(k, i) is operand k's element offset of the
// row-major linear index i.
constexpr int kMaxDims = 8;
template <int N>
struct StridedIndexer {
  int rank = 0;
  int64_t sizes[kMaxDims];
  int64_t strides[N][kMaxDims];

  // i must be below the product of the sizes: the outermost index is then i
  // itself after the inner dims are divided out (no division for rank 1).
  __device__ __forceinline__ void Offsets(int64_t i, int64_t (&out)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = 0;
    if (rank == 0) return;
    for (int d = rank - 1; d > 0; --d) {
      const int64_t size = sizes[d];
      const int64_t index = i % size;
      i /= size;
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] += index * strides[k][d];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] += i * strides[k][0];
  }
};

// An indexer over `shape` with the given per-operand strides (each of the
// shape's rank). Checks rank <= kMaxDims.
template <int N>
StridedIndexer<N> MakeStridedIndexer(const Shape& shape,
                                     const Shape* const (&strides)[N]) {
  // A user's strided view can get here (nothing merges its dims): an
  // error, as CopyInto gives for the same view, not an abort.
  LC_REQUIRE(shape.size() <= static_cast<size_t>(kMaxDims),
             "a CUDA kernel got a view of shape ", ShapeToString(shape), ", ",
             shape.size(),
             " dims after merging contiguous ones (expected at most ", kMaxDims,
             ")");
  StridedIndexer<N> indexer;
  indexer.rank = static_cast<int>(shape.size());
  for (int d = 0; d < indexer.rank; ++d) {
    indexer.sizes[d] = shape[d];
    for (int k = 0; k < N; ++k) indexer.strides[k][d] = (*strides[k])[d];
  }
  return indexer;
}

// MakeStridedIndexer over an equivalent iteration of fewer dims: dims of size
// 1 are dropped and each dim is merged into the next outer one when every
// operand steps over both as one (outer stride == inner size * inner stride).
// Offsets(k, i) are unchanged for every row-major index i; kernels divide
// less per element, and an all-contiguous walk becomes rank <= 1 with unit
// strides (see IsUnitStride).
template <int N>
StridedIndexer<N> MakeCoalescedIndexer(const Shape& shape,
                                       const Shape* const (&strides)[N]) {
  Shape sizes;
  Shape merged[N];
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    bool mergeable = !sizes.empty();
    for (int k = 0; k < N && mergeable; ++k) {
      mergeable = merged[k].back() == shape[d] * (*strides[k])[d];
    }
    if (mergeable) {
      sizes.back() *= shape[d];
      for (int k = 0; k < N; ++k) merged[k].back() = (*strides[k])[d];
    } else {
      sizes.push_back(shape[d]);
      for (int k = 0; k < N; ++k) merged[k].push_back((*strides[k])[d]);
    }
  }
  const Shape* merged_ptrs[N];
  for (int k = 0; k < N; ++k) merged_ptrs[k] = &merged[k];
  return MakeStridedIndexer<N>(sizes, merged_ptrs);
}

// Whether every operand's offset equals the linear index (a coalesced walk
// over dense, same-shape operands).
template <int N>
bool IsUnitStride(const StridedIndexer<N>& indexer) {
  if (indexer.rank > 1) return false;
  for (int k = 0; k < N && indexer.rank == 1; ++k) {
    if (indexer.strides[k][0] != 1) return false;
  }
  return true;
}

// Makes `device` current on this thread and returns its current stream: the
// stream every kernel on tensors of `device` is launched on.
inline cudaStream_t LaunchStream(Device device) {
  LC_CUDA_CHECK(cudaSetDevice(device.index));
  return CurrentCudaStream(device);
}

// Blocks for a grid-stride loop over n items with `threads` per block.
inline unsigned GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1)
                                                  : 65535 * 8);
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T WarpMax(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `shared` holds 32 T. Contains __syncthreads.
template <typename T>
__device__ __forceinline__ T BlockSum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // `shared` may still be read by a previous call.
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? shared[lane] : T(0);
  return WarpSum(v);
}

// Max of v over the block; like BlockSum. Empty lanes contribute `lowest`.
template <typename T>
__device__ __forceinline__ T BlockMax(T v, T* shared, T lowest) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? shared[lane] : lowest;
  return WarpMax(v);
}

// Threads of a block that reduces one row of `length` elements (with
// BlockSum / BlockMax, one block per row): a warp for short rows, up to 512
// threads for long ones.
inline int RowThreads(int64_t length) {
  if (length <= 256) return 32;
  if (length <= 1024) return 128;
  if (length <= 4096) return 256;
  return 512;
}

}  // namespace cuda
}  // namespace lc

// Runs the lambda with `scalar_t` bound to float, double or __nv_bfloat16
// for DTYPE (CUDA kernels compute bfloat16 natively in float32 registers);
// other dtypes throw lc::Error naming OP_NAME.
#define LC_CUDA_DISPATCH_FLOATING(DTYPE, OP_NAME, ...)                 \
  do {                                                                 \
    switch (DTYPE) {                                                   \
      case ::lc::DType::kFloat32: {                                    \
        using scalar_t = float;                                        \
        (__VA_ARGS__)();                                               \
        break;                                                         \
      }                                                                \
      case ::lc::DType::kFloat64: {                                    \
        using scalar_t = double;                                       \
        (__VA_ARGS__)();                                               \
        break;                                                         \
      }                                                                \
      case ::lc::DType::kBFloat16: {                                   \
        using scalar_t = __nv_bfloat16;                                \
        (__VA_ARGS__)();                                               \
        break;                                                         \
      }                                                                \
      default:                                                         \
        ::lc::ThrowInvalidArgument(OP_NAME,                            \
                                   ": expected a float32, float64 or " \
                                   "bfloat16 tensor, got ",            \
                                   ::lc::DTypeName(DTYPE));            \
    }                                                                  \
  } while (false)

#endif  // LONGCTX_OPS_CUDA_KERNEL_CUH_
