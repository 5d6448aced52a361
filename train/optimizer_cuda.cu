#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/check.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "train/optimizer_cuda.h"

namespace lc {
namespace {

constexpr int kThreads = 256;
// Tensors per launch: TensorList below stays under the classic 4 KiB limit
// of kernel arguments (48 * 48 + 49 * 8 + 8 bytes).
constexpr int kTensorsPerLaunch = 48;
// Elements one block handles at a time; a tensor is cut into chunks of this
// many (the last shorter), and blocks take chunks in a grid-stride loop.
constexpr int64_t kChunk = 16384;
constexpr int64_t kMaxBlocks = 4096;

// Up to kTensorsPerLaunch tensors, passed by value as one kernel argument.
// Tensor t covers the chunks [first_chunk[t], first_chunk[t + 1]) of the
// launch.
struct TensorList {
  float* param[kTensorsPerLaunch];
  float* grad[kTensorsPerLaunch];
  float* m[kTensorsPerLaunch];
  float* v[kTensorsPerLaunch];
  double decay[kTensorsPerLaunch];
  int64_t numel[kTensorsPerLaunch];
  int64_t first_chunk[kTensorsPerLaunch + 1];
  int count = 0;
};

int64_t Chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// The launches of `entries` (those with numel > 0), in order.
std::vector<TensorList> MakeLists(
    const std::vector<MultiTensorEntry>& entries) {
  std::vector<TensorList> lists;
  for (const MultiTensorEntry& e : entries) {
    if (e.numel == 0) continue;
    if (lists.empty() || lists.back().count == kTensorsPerLaunch) {
      lists.emplace_back();
      lists.back().first_chunk[0] = 0;
    }
    TensorList& list = lists.back();
    const int t = list.count++;
    list.param[t] = e.param;
    list.grad[t] = e.grad;
    list.m[t] = e.m;
    list.v[t] = e.v;
    list.decay[t] = e.decay;
    list.numel[t] = e.numel;
    list.first_chunk[t + 1] = list.first_chunk[t] + Chunks(e.numel);
  }
  return lists;
}

__host__ __device__ inline int64_t TotalChunks(const TensorList& list) {
  return list.first_chunk[list.count];
}

unsigned BlocksFor(const TensorList& list) {
  return static_cast<unsigned>(std::min(TotalChunks(list), kMaxBlocks));
}

// The tensor of the launch that holds `chunk` (a block-uniform search over
// at most kTensorsPerLaunch prefix sums).
__device__ __forceinline__ int TensorOfChunk(const TensorList& list,
                                             int64_t chunk) {
  int t = 0;
  while (list.first_chunk[t + 1] <= chunk) ++t;
  return t;
}

// AdamW on every element of the launch's tensors: param, grad, m, v are
// float32 [numel[t]] each; the math is train/optimizer.cc's UpdateParameter
// in float64 with each product and sum rounded on its own (no fused
// multiply-add), so the float32 results equal the CPU's.
__global__ void AdamWKernel(const __grid_constant__ TensorList list,
                            const AdamWConstants c, double one_minus_beta1,
                            double one_minus_beta2) {
  const int64_t total = TotalChunks(list);
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    const int t = TensorOfChunk(list, chunk);
    const int64_t begin = (chunk - list.first_chunk[t]) * kChunk;
    const int64_t end = min(begin + kChunk, list.numel[t]);
    float* const param = list.param[t];
    const float* const grad = list.grad[t];
    float* const m = list.m[t];
    float* const v = list.v[t];
    const double decay = list.decay[t];
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double g = static_cast<double>(grad[i]);
      const double mi = __dadd_rn(__dmul_rn(c.beta1, static_cast<double>(m[i])),
                                  __dmul_rn(one_minus_beta1, g));
      const double vi = __dadd_rn(__dmul_rn(c.beta2, static_cast<double>(v[i])),
                                  __dmul_rn(__dmul_rn(one_minus_beta2, g), g));
      m[i] = __double2float_rn(mi);
      v[i] = __double2float_rn(vi);
      const double denom =
          __dadd_rn(__ddiv_rn(__dsqrt_rn(vi), c.bias_correction2_sqrt), c.eps);
      const double p =
          __dsub_rn(__dmul_rn(static_cast<double>(param[i]), decay),
                    __ddiv_rn(__dmul_rn(c.step_size, mi), denom));
      param[i] = __double2float_rn(p);
    }
  }
}

__device__ __forceinline__ double WarpSum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// Sum of x over the block (kThreads threads), valid in thread 0; a fixed
// order, so equal inputs give equal sums.
__device__ double BlockSum(double x) {
  __shared__ double warp_sums[kThreads / 32];
  x = WarpSum(x);
  __syncthreads();  // warp_sums may still be read by a previous call
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = x;
  __syncthreads();
  x = 0;
  if (threadIdx.x < 32) {
    x = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
    x = WarpSum(x);
  }
  return x;
}

// partials[chunk] = sum of grad^2 over the chunk's elements, for every chunk
// of the launch; partials holds TotalChunks(list) float64.
__global__ void SumOfSquaresKernel(const __grid_constant__ TensorList list,
                                   double* partials) {
  const int64_t total = TotalChunks(list);
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    const int t = TensorOfChunk(list, chunk);
    const int64_t begin = (chunk - list.first_chunk[t]) * kChunk;
    const int64_t end = min(begin + kChunk, list.numel[t]);
    const float* const grad = list.grad[t];
    double sum = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double g = static_cast<double>(grad[i]);
      sum = __dadd_rn(sum, __dmul_rn(g, g));
    }
    sum = BlockSum(sum);
    if (threadIdx.x == 0) partials[chunk] = sum;
  }
}

// out[0] = sum of partials[0..n) in a fixed order (one block).
__global__ void SumPartialsKernel(const double* partials, int64_t n,
                                  double* out) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += partials[i];
  sum = BlockSum(sum);
  if (threadIdx.x == 0) out[0] = sum;
}

// grad = float(double(grad) * factor) on every element of the launch.
__global__ void ScaleKernel(const __grid_constant__ TensorList list,
                            double factor) {
  const int64_t total = TotalChunks(list);
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    const int t = TensorOfChunk(list, chunk);
    const int64_t begin = (chunk - list.first_chunk[t]) * kChunk;
    const int64_t end = min(begin + kChunk, list.numel[t]);
    float* const grad = list.grad[t];
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      grad[i] =
          __double2float_rn(__dmul_rn(static_cast<double>(grad[i]), factor));
    }
  }
}

cudaStream_t StreamOf(int device) {
  LC_CUDA_CHECK(cudaSetDevice(device));
  return CurrentCudaStream(device);
}

}  // namespace

void AdamWStepCuda(int device, const std::vector<MultiTensorEntry>& entries,
                   const AdamWConstants& constants) {
  const cudaStream_t stream = StreamOf(device);
  for (const TensorList& list : MakeLists(entries)) {
    AdamWKernel<<<BlocksFor(list), kThreads, 0, stream>>>(
        list, constants, 1 - constants.beta1, 1 - constants.beta2);
    LC_CUDA_CHECK_LAUNCH("AdamWKernel");
  }
}

double SumOfSquaresCuda(int device,
                        const std::vector<MultiTensorEntry>& entries) {
  const cudaStream_t stream = StreamOf(device);
  const std::vector<TensorList> lists = MakeLists(entries);
  if (lists.empty()) return 0;
  int64_t chunks = 0;
  for (const TensorList& list : lists) chunks += TotalChunks(list);
  // partials[0..chunks) and, after them, the sum.
  const std::shared_ptr<Storage> scratch =
      Storage::Allocate((chunks + 1) * static_cast<int64_t>(sizeof(double)),
                        Device::Cuda(device));
  double* const partials = static_cast<double*>(scratch->data());
  int64_t offset = 0;
  for (const TensorList& list : lists) {
    SumOfSquaresKernel<<<BlocksFor(list), kThreads, 0, stream>>>(
        list, partials + offset);
    LC_CUDA_CHECK_LAUNCH("SumOfSquaresKernel");
    offset += TotalChunks(list);
  }
  SumPartialsKernel<<<1, kThreads, 0, stream>>>(partials, chunks,
                                                partials + chunks);
  LC_CUDA_CHECK_LAUNCH("SumPartialsKernel");
  double sum = 0;
  CopyBytes(&sum, Device::Cpu(), partials + chunks, Device::Cuda(device),
            sizeof(double));
  return sum;
}

void ScaleCuda(int device, const std::vector<MultiTensorEntry>& entries,
               double factor) {
  const cudaStream_t stream = StreamOf(device);
  for (const TensorList& list : MakeLists(entries)) {
    ScaleKernel<<<BlocksFor(list), kThreads, 0, stream>>>(list, factor);
    LC_CUDA_CHECK_LAUNCH("ScaleKernel");
  }
}

}  // namespace lc
