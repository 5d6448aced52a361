#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "core/cuda.h"
#include "ops/cuda_kernel.cuh"
#include "ops/shape_ops_cuda.h"

namespace lc {
namespace internal {
namespace {

constexpr int kThreads = 256;

// *first = min(*first, every position p < n whose value indices[p] is
// outside [0, size) and not ignore_index when has_ignore). A thread stops at
// its first bad position (its later ones are larger).
__global__ void FirstInvalidIndexKernel(const int64_t* indices, int64_t n,
                                        int64_t size, bool has_ignore,
                                        int64_t ignore_index,
                                        unsigned long long* first) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       p < n; p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = indices[p];
    if ((v < 0 || v >= size) && !(has_ignore && v == ignore_index)) {
      atomicMin(first, static_cast<unsigned long long>(p));
      return;
    }
  }
}

// out[o, l, i] = x[o, index[l], i] for dense x [outer, size, inner], index
// [num] and out [outer, num, inner]. E is an unsigned integer of the
// element's size: the gather moves bits, for any dtype.
template <typename E>
__global__ void GatherRowsKernel(const E* x, const int64_t* index,
                                 int64_t outer, int64_t size, int64_t num,
                                 int64_t inner, E* out) {
  const int64_t n = outer * num * inner;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       j < n; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = j % inner;
    const int64_t row = j / inner;
    const int64_t o = row / num;
    out[j] = x[(o * size + index[row - o * num]) * inner + i];
  }
}

// values[p] = p for p < n.
__global__ void IotaKernel(int64_t n, int64_t* values) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       p < n; p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    values[p] = p;
  }
}

// starts[s] = the first j with sorted_index[j] >= s (num when none), for s
// in [0, size], by binary search in the ascending sorted_index [num]: the
// positions holding index s are order[starts[s]] .. order[starts[s+1] - 1].
__global__ void SegmentStartsKernel(const int64_t* sorted_index, int64_t num,
                                    int64_t size, int64_t* starts) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       s <= size; s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = num;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_index[mid] < s) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    starts[s] = lo;
  }
}

// dx[o, s, i] = sum over j in [starts[s], starts[s+1]) of g[o, order[j], i],
// added in order of j in A (order lists the positions l of index s in
// increasing l), for dense g [outer, num, inner] and dx [outer, size, inner].
template <typename T, typename A = cuda::compute_t<T>>
__global__ void IndexAddRowsKernel(const T* g, const int64_t* order,
                                   const int64_t* starts, int64_t outer,
                                   int64_t size, int64_t num, int64_t inner,
                                   T* dx) {
  const int64_t n = outer * size * inner;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       j < n; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = j % inner;
    const int64_t row = j / inner;
    const int64_t o = row / size;
    const int64_t s = row - o * size;
    const T* g_outer = g + o * num * inner + i;
    A sum = 0;
    for (int64_t k = starts[s]; k < starts[s + 1]; ++k) {
      sum += cuda::Load(g_outer + order[k] * inner);
    }
    cuda::Store(dx + j, sum);
  }
}

template <typename E>
void LaunchGather(const Tensor& x, const Tensor& index, int64_t outer,
                  int64_t size, int64_t num, int64_t inner, const Tensor& out,
                  cudaStream_t stream) {
  GatherRowsKernel<E>
      <<<cuda::GridFor(out.numel(), kThreads), kThreads, 0, stream>>>(
          static_cast<const E*>(x.raw_data()),
          static_cast<const int64_t*>(index.raw_data()), outer, size, num,
          inner, static_cast<E*>(out.raw_data()));
  LC_CUDA_CHECK_LAUNCH("GatherRowsKernel");
}

}  // namespace

int64_t FirstInvalidIndexCuda(const Tensor& indices, int64_t size,
                              bool has_ignore, int64_t ignore_index) {
  const int64_t n = indices.numel();
  if (n == 0) return -1;
  const cudaStream_t stream = cuda::LaunchStream(indices.device());
  // Starts at n (no bad position); n < 2^53 is exact as a double.
  const Tensor first =
      Full({1}, static_cast<double>(n), DType::kInt64, indices.device());
  FirstInvalidIndexKernel<<<cuda::GridFor(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const int64_t*>(indices.raw_data()), n, size, has_ignore,
      ignore_index, static_cast<unsigned long long*>(first.raw_data()));
  LC_CUDA_CHECK_LAUNCH("FirstInvalidIndexKernel");
  int64_t position = 0;
  CopyBytes(&position, Device::Cpu(), first.raw_data(), first.device(),
            sizeof(position));
  return position < n ? position : -1;
}

void GatherRowsCuda(const Tensor& x, const Tensor& index, int64_t outer,
                    int64_t size, int64_t inner, const Tensor& out) {
  if (out.numel() == 0) return;
  const cudaStream_t stream = cuda::LaunchStream(out.device());
  const int64_t num = index.numel();
  switch (DTypeSize(x.dtype())) {
    case 1:
      LaunchGather<uint8_t>(x, index, outer, size, num, inner, out, stream);
      break;
    case 2:
      LaunchGather<uint16_t>(x, index, outer, size, num, inner, out, stream);
      break;
    case 4:
      LaunchGather<uint32_t>(x, index, outer, size, num, inner, out, stream);
      break;
    default:
      LC_CHECK_EQ(DTypeSize(x.dtype()), 8);
      LaunchGather<uint64_t>(x, index, outer, size, num, inner, out, stream);
  }
}

void IndexAddRowsCuda(const Tensor& g, const Tensor& index, int64_t outer,
                      int64_t size, int64_t inner, const Tensor& dx) {
  if (dx.numel() == 0) return;
  const Device device = dx.device();
  const cudaStream_t stream = cuda::LaunchStream(device);
  const int64_t num = index.numel();
  // order: the positions 0..num-1 stably sorted by their index, sorted_index
  // the indices in that order (a radix sort over the bits that [0, size)
  // needs).
  const Tensor positions = Empty({num}, DType::kInt64, device);
  const Tensor order = Empty({num}, DType::kInt64, device);
  const Tensor sorted_index = Empty({num}, DType::kInt64, device);
  if (num > 0) {
    IotaKernel<<<cuda::GridFor(num, kThreads), kThreads, 0, stream>>>(
        num, static_cast<int64_t*>(positions.raw_data()));
    LC_CUDA_CHECK_LAUNCH("IotaKernel");
    int end_bit = 1;
    while (end_bit < 63 && (int64_t{1} << end_bit) < size) ++end_bit;
    const int64_t* keys_in = static_cast<const int64_t*>(index.raw_data());
    int64_t* keys_out = static_cast<int64_t*>(sorted_index.raw_data());
    const int64_t* values_in =
        static_cast<const int64_t*>(positions.raw_data());
    int64_t* values_out = static_cast<int64_t*>(order.raw_data());
    size_t temp_bytes = 0;
    LC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys_in, keys_out, values_in, values_out, num,
        /*begin_bit=*/0, end_bit, stream));
    // At least one byte: a null temp pointer would make cub only size it.
    const Tensor temp =
        Empty({std::max<int64_t>(1, static_cast<int64_t>(temp_bytes))},
              DType::kUInt8, device);
    LC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.raw_data(), temp_bytes, keys_in, keys_out, values_in, values_out,
        num, /*begin_bit=*/0, end_bit, stream));
  }
  const Tensor starts = Empty({size + 1}, DType::kInt64, device);
  SegmentStartsKernel<<<cuda::GridFor(size + 1, kThreads), kThreads, 0,
                        stream>>>(
      static_cast<const int64_t*>(sorted_index.raw_data()), num, size,
      static_cast<int64_t*>(starts.raw_data()));
  LC_CUDA_CHECK_LAUNCH("SegmentStartsKernel");
  LC_CUDA_DISPATCH_FLOATING(g.dtype(), "IndexSelect", [&] {
    IndexAddRowsKernel<scalar_t>
        <<<cuda::GridFor(dx.numel(), kThreads), kThreads, 0, stream>>>(
            static_cast<const scalar_t*>(g.raw_data()),
            static_cast<const int64_t*>(order.raw_data()),
            static_cast<const int64_t*>(starts.raw_data()), outer, size, num,
            inner, static_cast<scalar_t*>(dx.raw_data()));
    LC_CUDA_CHECK_LAUNCH("IndexAddRowsKernel");
  });
}

}  // namespace internal
}  // namespace lc
