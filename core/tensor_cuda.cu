#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/check.h"
#include "core/cuda.h"
#include "core/philox.h"
#include "core/status.h"
#include "core/tensor_cuda.h"

namespace lc {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDims = 8;

// Blocks of kThreads for a grid-stride loop over n elements.
unsigned BlocksFor(int64_t n) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535 * 8));
}

// Makes `device` current and returns the stream to launch on.
cudaStream_t LaunchStream(int device) {
  LC_CUDA_CHECK(cudaSetDevice(device));
  return CurrentCudaStream(device);
}

__device__ __forceinline__ float BFloat16ToFloat(bfloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

// bfloat16::FromFloat of core/dtype.h on the device: round to nearest even,
// NaN to the quiet NaN 0x7fc0 (cuda_bf16's conversion gives 0x7fff there).
__device__ __forceinline__ bfloat16 FloatToBFloat16(float f) {
  const uint32_t u = __float_as_uint(f);
  bfloat16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = 0x7fc0;
  } else {
    out.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}

// The CPU's Cast of core/tensor.cc: bfloat16 goes through float32, the rest
// is a C++ conversion (rounding to nearest, truncation to integers).
template <typename To, typename From>
__device__ __forceinline__ To Convert(From v) {
  if constexpr (std::is_same_v<From, bfloat16>) {
    return Convert<To>(BFloat16ToFloat(v));
  } else if constexpr (std::is_same_v<To, bfloat16>) {
    return FloatToBFloat16(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// The type AddInPlace adds in: float32 for bfloat16.
template <typename T>
using AccumulateType =
    std::conditional_t<std::is_same_v<T, bfloat16>, float, T>;

// Sizes and the strides (in elements) of two operands, dst and src, over up
// to kMaxDims dims; passed to kernels by value.
struct PairIndexer {
  int rank = 0;
  int64_t sizes[kMaxDims];
  int64_t dst_strides[kMaxDims];
  int64_t src_strides[kMaxDims];

  // The operands' element offsets of the row-major index i (< numel).
  __device__ __forceinline__ void Offsets(int64_t i, int64_t& dst,
                                          int64_t& src) const {
    dst = 0;
    src = 0;
    for (int d = rank - 1; d > 0; --d) {
      const int64_t index = i % sizes[d];
      i /= sizes[d];
      dst += index * dst_strides[d];
      src += index * src_strides[d];
    }
    if (rank > 0) {
      dst += i * dst_strides[0];
      src += i * src_strides[0];
    }
  }
};

// A PairIndexer over `shape` with dims of size 1 dropped and each dim merged
// into the next outer one where both operands step over the two as one (a
// dense copy becomes one dim of unit strides). `what` names the caller in
// the error for more than kMaxDims remaining dims.
PairIndexer MakeIndexer(const Shape& shape, const Shape& dst_strides,
                        const Shape& src_strides, const char* what) {
  LC_CHECK_EQ(dst_strides.size(), shape.size());
  LC_CHECK_EQ(src_strides.size(), shape.size());
  Shape sizes, dst, src;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    if (!sizes.empty() && dst.back() == shape[d] * dst_strides[d] &&
        src.back() == shape[d] * src_strides[d]) {
      sizes.back() *= shape[d];
      dst.back() = dst_strides[d];
      src.back() = src_strides[d];
    } else {
      sizes.push_back(shape[d]);
      dst.push_back(dst_strides[d]);
      src.push_back(src_strides[d]);
    }
  }
  LC_REQUIRE(
      sizes.size() <= static_cast<size_t>(kMaxDims), what, " on CUDA: shape ",
      ShapeToString(shape), " with strides ", ShapeToString(dst_strides),
      " and ", ShapeToString(src_strides), " has ", sizes.size(),
      " dims after merging contiguous ones (expected at most ", kMaxDims, ")");
  PairIndexer indexer;
  indexer.rank = static_cast<int>(sizes.size());
  for (int d = 0; d < indexer.rank; ++d) {
    indexer.sizes[d] = sizes[d];
    indexer.dst_strides[d] = dst[d];
    indexer.src_strides[d] = src[d];
  }
  return indexer;
}

// out[i] = value converted to T, for i < n (out: n dense elements).
template <typename T>
__global__ void FillKernel(T* out, int64_t n, double value) {
  const T v = Convert<T>(value);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = v;
  }
}

// out[i] = start + i * step (float64, two roundings), converted to T, for
// i < n (out: n dense elements).
template <typename T>
__global__ void ArangeKernel(T* out, int64_t n, double start, double step) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] =
        Convert<T>(__dadd_rn(start, __dmul_rn(static_cast<double>(i), step)));
  }
}

// out[i] = PhiloxUniform(seed, offset, i) converted to T, for i < n (out: n
// dense elements).
template <typename T>
__global__ void UniformKernel(T* out, int64_t n, uint64_t seed,
                              uint64_t offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = Convert<T>(PhiloxUniform(seed, offset, static_cast<uint64_t>(i)));
  }
}

// dst[index] = src[index] converted to D, over the n indices of `indexer`
// (dst and src: strided operands of the indexer's shape).
template <typename D, typename S>
__global__ void StridedCopyKernel(D* dst, const S* src, int64_t n,
                                  PairIndexer indexer) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t d, s;
    indexer.Offsets(i, d, s);
    dst[d] = Convert<D>(src[s]);
  }
}

// dst[index] += src[index] in AccumulateType<T>, over the n indices of
// `indexer` (dst and src: strided operands of the indexer's shape).
template <typename T>
__global__ void AddInPlaceKernel(T* dst, const T* src, int64_t n,
                                 PairIndexer indexer) {
  using A = AccumulateType<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t d, s;
    indexer.Offsets(i, d, s);
    dst[d] = Convert<T>(Convert<A>(dst[d]) + Convert<A>(src[s]));
  }
}

// dst[i] += src[i] in AccumulateType<T> for i < n, dst and src dense: W
// elements per thread and step (16-byte packets when W > 1, then both
// 16-byte aligned), the n % W tail one by one. The dense case of
// AddInPlaceKernel (gradient accumulation), at full bandwidth.
template <typename T, int W>
__global__ void AddInPlaceDenseKernel(T* dst, const T* src, int64_t n) {
  using A = AccumulateType<T>;
  struct alignas(sizeof(T) * W) Packet {
    T v[W];
  };
  const int64_t first =
      blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packets = n / W;
  for (int64_t p = first; p < packets; p += step) {
    Packet d = reinterpret_cast<Packet*>(dst)[p];
    const Packet s = reinterpret_cast<const Packet*>(src)[p];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      d.v[j] = Convert<T>(Convert<A>(d.v[j]) + Convert<A>(s.v[j]));
    }
    reinterpret_cast<Packet*>(dst)[p] = d;
  }
  for (int64_t i = packets * W + first; i < n; i += step) {
    dst[i] = Convert<T>(Convert<A>(dst[i]) + Convert<A>(src[i]));
  }
}

bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

void FillCuda(int device, void* data, DType dtype, int64_t numel,
              double value) {
  if (numel == 0) return;
  const cudaStream_t stream = LaunchStream(device);
  if (value == 0 && !std::signbit(value)) {
    // +0 is all zero bits in every dtype: a memset runs at full bandwidth.
    LC_CUDA_CHECK(cudaMemsetAsync(data, 0, numel * DTypeSize(dtype), stream));
    return;
  }
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    FillKernel<T><<<BlocksFor(numel), kThreads, 0, stream>>>(
        static_cast<T*>(data), numel, value);
  });
  LC_CUDA_CHECK_LAUNCH("FillKernel");
}

void ArangeCuda(int device, void* data, DType dtype, int64_t numel,
                double start, double step) {
  if (numel == 0) return;
  const cudaStream_t stream = LaunchStream(device);
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    ArangeKernel<T><<<BlocksFor(numel), kThreads, 0, stream>>>(
        static_cast<T*>(data), numel, start, step);
  });
  LC_CUDA_CHECK_LAUNCH("ArangeKernel");
}

void UniformCuda(int device, void* data, DType dtype, int64_t numel,
                 uint64_t seed, uint64_t offset) {
  LC_CHECK(IsFloating(dtype)) << DTypeName(dtype);
  if (numel == 0) return;
  const cudaStream_t stream = LaunchStream(device);
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    UniformKernel<T><<<BlocksFor(numel), kThreads, 0, stream>>>(
        static_cast<T*>(data), numel, seed, offset);
  });
  LC_CUDA_CHECK_LAUNCH("UniformKernel");
}

void StridedCopyCuda(int device, const Shape& shape, void* dst, DType dst_dtype,
                     const Shape& dst_strides, const void* src, DType src_dtype,
                     const Shape& src_strides) {
  const int64_t n = NumElements(shape);
  if (n == 0) return;
  const PairIndexer indexer =
      MakeIndexer(shape, dst_strides, src_strides, "CopyInto");
  const cudaStream_t stream = LaunchStream(device);
  DispatchAll(dst_dtype, [&](auto dst_tag) {
    using D = decltype(dst_tag);
    DispatchAll(src_dtype, [&](auto src_tag) {
      using S = decltype(src_tag);
      StridedCopyKernel<D, S><<<BlocksFor(n), kThreads, 0, stream>>>(
          static_cast<D*>(dst), static_cast<const S*>(src), n, indexer);
    });
  });
  LC_CUDA_CHECK_LAUNCH("StridedCopyKernel");
}

void AddInPlaceCuda(int device, const Shape& shape, DType dtype, void* dst,
                    const Shape& dst_strides, const void* src,
                    const Shape& src_strides) {
  LC_CHECK(IsFloating(dtype)) << DTypeName(dtype);
  const int64_t n = NumElements(shape);
  if (n == 0) return;
  const PairIndexer indexer =
      MakeIndexer(shape, dst_strides, src_strides, "AddInPlace");
  const cudaStream_t stream = LaunchStream(device);
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double> ||
                  std::is_same_v<T, bfloat16>) {
      T* d = static_cast<T*>(dst);
      const T* s = static_cast<const T*>(src);
      constexpr int kWidth = 16 / sizeof(T);
      const bool dense = indexer.rank == 0 ||
                         (indexer.rank == 1 && indexer.dst_strides[0] == 1 &&
                          indexer.src_strides[0] == 1);
      if (dense && Aligned16(d) && Aligned16(s)) {
        AddInPlaceDenseKernel<T, kWidth>
            <<<BlocksFor(n / kWidth + 1), kThreads, 0, stream>>>(d, s, n);
      } else if (dense) {
        AddInPlaceDenseKernel<T, 1>
            <<<BlocksFor(n), kThreads, 0, stream>>>(d, s, n);
      } else {
        AddInPlaceKernel<T>
            <<<BlocksFor(n), kThreads, 0, stream>>>(d, s, n, indexer);
      }
    }
  });
  LC_CUDA_CHECK_LAUNCH("AddInPlaceKernel");
}

}  // namespace lc
