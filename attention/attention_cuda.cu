// CUDA kernels of the partial-attention primitive (see attention_cuda.h).
//
// Every kernel runs one work item per thread block and batch index
// (grid = items x batch). A query item is a query tile of at most 128 rows
// with the key tiles it meets; a key item a key tile of at most 128 rows
// with the query tiles it meets. Rows of a tile are local rows row, row +
// row_step, ... of a [batch, rows, heads, head_dim] buffer (or a packed key
// buffer), so dilated rows are read in place. Within one launch (one pattern
// index) every output row belongs to one item, so each block owns the rows
// it writes: accumulators are read, merged and written back (or bfloat16
// outputs written) without atomics.
//
// Tensor-core kernels (bfloat16, head_dim 64 or 128): tiles are staged in
// shared memory by cp.async (16-byte copies, rows swizzled so that ldmatrix
// reads are free of bank conflicts, the next key or query chunk loading
// while the current one computes); products run on mma.sync m16n8k16 with
// bfloat16 operands and float32 accumulators; softmax runs online in
// registers in base 2 (scores pre-scaled by log2(e)). Masks and dropout are
// whole-tile passes taken only by the chunks that need them. These kernels
// live in attention_tensor_core.cuh, written once over a tensor-core policy:
// mma.sync here, Hopper's wgmma (attention_sm90.cu) on compute capability
// 9.0 devices when SetCudaTensorCoreKernels(kWgmma) asks for it.
// FMA kernels (float32, float64, other head dims): one warp per row, lanes
// across head_dim, the same work lists and the same pair rule.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention/attention_cuda.h"
#include "attention/attention_cuda_kernel.cuh"
#include "attention/attention_tensor_core.cuh"
#include "core/check.h"
#include "core/cuda.h"
#include "core/philox.h"

namespace lc {
namespace {

using namespace attention_cuda;  // NOLINT: the kernels' shared device code

// ---------------------------------------------------------------------------
// FMA kernels: one warp per row, lane l holding elements l, l + 32, ... of
// the row (kPerLane of them, head_dim <= 32 kPerLane). T is the storage type
// (float, double or bf16), A the accumulator type (double for double, else
// float), O the type of out / the gradients: A (merged or added into) or
// bf16 (written). Buffers as in the tensor-core kernels, row statistics in A.

constexpr int kSimtWarps = 8;

template <typename T, typename A, int kPerLane>
__device__ __forceinline__ void LoadRow(const T* row, int d, A (&x)[kPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    x[i] = c < d ? ToAcc<A>(row[c]) : A(0);
  }
}

template <typename A, int kPerLane>
__device__ __forceinline__ A WarpDot(const A (&x)[kPerLane],
                                     const A (&y)[kPerLane]) {
  A sum = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum += x[i] * y[i];
  return WarpSum(sum);
}

// Forward: one block per (query item, batch index), warp w taking the
// item's query rows w, w + kSimtWarps, ...; online softmax over the keys,
// one key at a time.
template <typename T, typename A, typename O, int kPerLane>
__global__ void __launch_bounds__(kSimtWarps * 32)
    ForwardSimtKernel(const KernelArgs a) {
  const CudaWorkItem item = a.items[blockIdx.x];
  const CudaTileRows qt = item.rows;
  const int64_t b = blockIdx.y;
  const int d = static_cast<int>(a.head_dim);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t q_pitch = a.q_row_stride, k_pitch = a.k_row_stride;
  const int64_t q_offset = QueryOffset(a, b, item.head);
  const int64_t k_offset = KeyOffset(a, b, item.head);
  const T* q_head = static_cast<const T*>(a.q) + q_offset;
  const T* k_head = static_cast<const T*>(a.k) + k_offset;
  const T* v_head = static_cast<const T*>(a.v) + k_offset;
  O* out_head = static_cast<O*>(a.out_acc) + q_offset;
  A* lse_head =
      static_cast<A*>(a.lse_acc) + (b * a.heads + item.head) * a.q_rows;
  constexpr bool kMerge = std::is_same<O, A>::value;
  const A scale = static_cast<A>(a.scale);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - a.dropout));
  const uint64_t stream = DropoutStream(a, b, item);

  for (int r = warp; r < qt.count; r += kSimtWarps) {
    const int64_t row = qt.row + static_cast<int64_t>(r) * qt.row_step;
    const int t = qt.position + r * qt.position_step;
    A q[kPerLane], o[kPerLane];
    LoadRow(q_head + row * q_pitch, d, q);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] = 0;
    A m = NegInf<A>(), l = 0;
    for (int kt = item.first; kt < item.last; ++kt) {
      const CudaTileRows tile = a.tiles[kt];
      for (int j = 0; j < tile.count; ++j) {
        const int u = tile.position + j * tile.position_step;
        if (a.causal && u > t) break;  // keys ascend
        if (!PairAllowed(a, b, t, u)) continue;
        const int64_t key =
            (tile.row + static_cast<int64_t>(j) * tile.row_step) * k_pitch;
        A kv[kPerLane], vv[kPerLane];
        LoadRow(k_head + key, d, kv);
        LoadRow(v_head + key, d, vv);
        const A s = WarpDot(q, kv) * scale;
        const A m_new = s > m ? s : m;
        // While every score so far is -inf (a -inf in q or k), 0 stands in
        // for the max so that no -inf - -inf makes the row NaN.
        const A base = m_new == NegInf<A>() ? A(0) : m_new;
        const A correction = Exp(m - base);
        A p = Exp(s - base);
        l = l * correction + p;
        if (a.dropout > 0) {
          p = DropoutKeeps(a, stream, t, u) ? p * keep_scale : A(0);
        }
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) o[i] = o[i] * correction + p * vv[i];
        m = m_new;
      }
    }
    if (l == 0) continue;  // no allowed key: the accumulators stay
    A* lse_at = lse_head + row;
    // A +inf score makes l NaN (and o): lse is +inf, as on the CPU.
    const A lse = m == -NegInf<A>() ? m : m + Log(l);
    const Merge<A> merge = MergeOf(kMerge ? *lse_at : NegInf<A>(), lse);
    __syncwarp();  // every lane has read the old lse
    O* out_row = out_head + row * q_pitch;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c >= d) continue;
      if constexpr (kMerge) {
        out_row[c] = merge.Apply(out_row[c], o[i] / l);
      } else {
        AddOrStore(out_row + c, o[i] / l);
      }
    }
    if (lane == 0) *lse_at = merge.lse;
  }
}

// dQ: like the forward, one warp per query row walking the item's keys.
template <typename T, typename A, typename O, int kPerLane>
__global__ void __launch_bounds__(kSimtWarps * 32)
    GradQuerySimtKernel(const KernelArgs a) {
  const CudaWorkItem item = a.items[blockIdx.x];
  const CudaTileRows qt = item.rows;
  const int64_t b = blockIdx.y;
  const int d = static_cast<int>(a.head_dim);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t q_pitch = a.q_row_stride, k_pitch = a.k_row_stride;
  const int64_t q_offset = QueryOffset(a, b, item.head);
  const int64_t k_offset = KeyOffset(a, b, item.head);
  const T* q_head = static_cast<const T*>(a.q) + q_offset;
  const T* g_head = static_cast<const T*>(a.grad_out) + q_offset;
  const T* k_head = static_cast<const T*>(a.k) + k_offset;
  const T* v_head = static_cast<const T*>(a.v) + k_offset;
  const int64_t stat_head = (b * a.heads + item.head) * a.q_rows;
  O* dq_head = static_cast<O*>(a.dq) + q_offset;
  const A scale = static_cast<A>(a.scale);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - a.dropout));
  const uint64_t stream = DropoutStream(a, b, item);

  for (int r = warp; r < qt.count; r += kSimtWarps) {
    const int64_t row = qt.row + static_cast<int64_t>(r) * qt.row_step;
    const int t = qt.position + r * qt.position_step;
    const A lse = static_cast<const A*>(a.lse)[stat_head + row];
    if (lse == NegInf<A>()) continue;  // no key: no gradient
    const A dd = static_cast<const A*>(a.delta)[stat_head + row] -
                 static_cast<const A*>(a.grad_lse)[stat_head + row];
    A q[kPerLane], g[kPerLane], dq[kPerLane];
    LoadRow(q_head + row * q_pitch, d, q);
    LoadRow(g_head + row * q_pitch, d, g);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dq[i] = 0;
    for (int kt = item.first; kt < item.last; ++kt) {
      const CudaTileRows tile = a.tiles[kt];
      for (int j = 0; j < tile.count; ++j) {
        const int u = tile.position + j * tile.position_step;
        if (a.causal && u > t) break;
        if (!PairAllowed(a, b, t, u)) continue;
        const int64_t key =
            (tile.row + static_cast<int64_t>(j) * tile.row_step) * k_pitch;
        A kv[kPerLane], vv[kPerLane];
        LoadRow(k_head + key, d, kv);
        LoadRow(v_head + key, d, vv);
        const A p = Exp(WarpDot(q, kv) * scale - lse);
        A dp = WarpDot(g, vv);
        if (a.dropout > 0) {
          dp = DropoutKeeps(a, stream, t, u) ? dp * keep_scale : A(0);
        }
        const A ds = p * (dp - dd);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) dq[i] += ds * kv[i];
      }
    }
    O* dq_row = dq_head + row * q_pitch;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) AddOrStore(dq_row + c, scale * dq[i]);
    }
  }
}

// dK and dV: one block per (key item, batch index), warp w taking the
// item's key rows w, w + kSimtWarps, ... and walking its queries.
template <typename T, typename A, typename O, int kPerLane>
__global__ void __launch_bounds__(kSimtWarps * 32)
    GradKeyValueSimtKernel(const KernelArgs a) {
  const CudaWorkItem item = a.items[blockIdx.x];
  const CudaTileRows kt = item.rows;
  const int64_t b = blockIdx.y;
  const int d = static_cast<int>(a.head_dim);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t q_pitch = a.q_row_stride, k_pitch = a.k_row_stride;
  const int64_t q_offset = QueryOffset(a, b, item.head);
  const int64_t k_offset = KeyOffset(a, b, item.head);
  const T* q_head = static_cast<const T*>(a.q) + q_offset;
  const T* g_head = static_cast<const T*>(a.grad_out) + q_offset;
  const T* k_head = static_cast<const T*>(a.k) + k_offset;
  const T* v_head = static_cast<const T*>(a.v) + k_offset;
  const int64_t stat_head = (b * a.heads + item.head) * a.q_rows;
  O* dk_head = static_cast<O*>(a.dk) + k_offset;
  O* dv_head = static_cast<O*>(a.dv) + k_offset;
  const A scale = static_cast<A>(a.scale);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - a.dropout));
  const uint64_t stream = DropoutStream(a, b, item);

  for (int r = warp; r < kt.count; r += kSimtWarps) {
    const int64_t key =
        (kt.row + static_cast<int64_t>(r) * kt.row_step) * k_pitch;
    const int u = kt.position + r * kt.position_step;
    A kv[kPerLane], vv[kPerLane], dk[kPerLane], dv[kPerLane];
    LoadRow(k_head + key, d, kv);
    LoadRow(v_head + key, d, vv);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dk[i] = dv[i] = 0;
    for (int qi = item.first; qi < item.last; ++qi) {
      const CudaTileRows tile = a.tiles[qi];
      for (int j = 0; j < tile.count; ++j) {
        const int t = tile.position + j * tile.position_step;
        if (!PairAllowed(a, b, t, u)) continue;
        const int64_t row = tile.row + static_cast<int64_t>(j) * tile.row_step;
        const A lse = static_cast<const A*>(a.lse)[stat_head + row];
        if (lse == NegInf<A>()) continue;
        const A dd = static_cast<const A*>(a.delta)[stat_head + row] -
                     static_cast<const A*>(a.grad_lse)[stat_head + row];
        A q[kPerLane], g[kPerLane];
        LoadRow(q_head + row * q_pitch, d, q);
        LoadRow(g_head + row * q_pitch, d, g);
        const A p = Exp(WarpDot(q, kv) * scale - lse);
        A dp = WarpDot(g, vv);
        A p_dropped = p;
        if (a.dropout > 0) {
          const bool keep = DropoutKeeps(a, stream, t, u);
          p_dropped = keep ? p * keep_scale : A(0);
          dp = keep ? dp * keep_scale : A(0);
        }
        const A ds = p * (dp - dd);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          dv[i] += p_dropped * g[i];
          dk[i] += ds * q[i];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c >= d) continue;
      AddOrStore(dk_head + key + c, scale * dk[i]);
      AddOrStore(dv_head + key + c, dv[i]);
    }
  }
}

// delta[b, h, t] = sum_c out[b, t, h, c] * grad_out[b, t, h, c]: one warp per
// (b, t, h) row, grid-stride. out, grad_out: [batch, rows, heads, d] of T;
// delta: [batch, heads, rows] of A.
template <typename T, typename A>
__global__ void RowDeltaKernel(const T* out, const T* grad_out, A* delta,
                               int64_t batch, int64_t rows, int64_t heads,
                               int d) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t w =
           (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
       w < batch * rows * heads; w += warps) {
    const int64_t h = w % heads, bt = w / heads;
    const int64_t b = bt / rows, t = bt % rows;
    A sum = 0;
    for (int c = lane; c < d; c += 32) {
      sum += ToAcc<A>(out[w * d + c]) * ToAcc<A>(grad_out[w * d + c]);
    }
    sum = WarpSum(sum);
    if (lane == 0) delta[(b * heads + h) * rows + t] = sum;
  }
}

// ---------------------------------------------------------------------------
// Launching.

KernelArgs MakeKernelArgs(const CudaAttentionArgs& args,
                          const CudaWorkList& work) {
  KernelArgs ka;
  ka.n = args.n;
  ka.heads = args.heads;
  ka.head_dim = args.head_dim;
  ka.q_rows = args.q_rows;
  ka.max_patterns = args.max_patterns;
  ka.q_batch_stride = args.q_batch_stride;
  ka.q_row_stride = args.q_row_stride;
  ka.k_batch_stride = args.k_batch_stride;
  ka.k_row_stride = args.k_row_stride;
  ka.k_head_stride = args.k_head_stride;
  ka.scale = args.scale;
  ka.scale_log2 = static_cast<float>(args.scale * 1.4426950408889634);
  ka.causal = args.causal;
  ka.key_padding = args.key_padding;
  ka.dropout = args.dropout;
  ka.dropout_seed = args.dropout_seed;
  ka.dropout_offset = args.dropout_offset;
  ka.tiles = work.tiles;
  return ka;
}

// Whether every row of every buffer of a call starts on a 16-byte boundary,
// as the tensor-core kernels need (they copy rows 16 bytes at a time with
// cp.async and write outputs in pairs): the buffers' bases, and the element
// strides between batches, rows and heads of both sides in bfloat16 (the
// outputs' elements are as large or larger, so their strides follow).
bool RowsAligned(const CudaAttentionArgs& args,
                 std::initializer_list<const void*> buffers) {
  for (const void* p : buffers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  for (int64_t stride :
       {args.q_batch_stride, args.q_row_stride, args.head_dim,
        args.k_batch_stride, args.k_row_stride, args.k_head_stride}) {
    if (stride * static_cast<int64_t>(sizeof(bf16)) % 16 != 0) return false;
  }
  return true;
}

// Calls fn(D{}, OutT{}) for the tensor-core kernels' head_dim and output
// type, or returns false when they do not take the call: bfloat16 inputs,
// head_dim 64 or 128, every row of `buffers` (inputs and outputs) 16-byte
// aligned. Other calls run on the FMA kernels, which take any alignment.
template <typename Fn>
bool DispatchMma(const CudaAttentionArgs& args,
                 std::initializer_list<const void*> buffers, Fn&& fn) {
  if (args.dtype != DType::kBFloat16) return false;
  if (args.head_dim != 64 && args.head_dim != 128) return false;
  if (!RowsAligned(args, buffers)) return false;
  const bool write = args.out_dtype == DType::kBFloat16;
  if (args.head_dim == 64) {
    write ? fn(std::integral_constant<int, 64>(), bf16{})
          : fn(std::integral_constant<int, 64>(), float{});
  } else {
    write ? fn(std::integral_constant<int, 128>(), bf16{})
          : fn(std::integral_constant<int, 128>(), float{});
  }
  return true;
}

// Calls fn.template operator()<kPerLane>() with the lanes per element count
// the head dim needs.
template <typename Fn>
void DispatchPerLane(int64_t head_dim, Fn&& fn) {
  if (head_dim <= 32) return fn.template operator()<1>();
  if (head_dim <= 64) return fn.template operator()<2>();
  if (head_dim <= 128) return fn.template operator()<4>();
  return fn.template operator()<8>();
}

// Calls fn(T{}, A{}) for the storage and accumulator types of `dtype`.
template <typename Fn>
void DispatchTypes(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{}, float{});
    case DType::kFloat64:
      return fn(double{}, double{});
    case DType::kBFloat16:
      return fn(bf16{}, float{});
    default:
      LC_CHECK(false) << "attention kernels take float32, float64, bfloat16";
  }
}

template <typename T, typename A, typename O>
struct SimtLaunch {
  const CudaAttentionArgs& args;
  const CudaWorkList& work;
  const KernelArgs& ka;
  int which;  // 0 forward, 1 dQ, 2 dK/dV

  template <int kPerLane>
  void operator()() const {
    const int threads = kSimtWarps * 32;
    if (which == 0) {
      LaunchPerPattern(ForwardSimtKernel<T, A, O, kPerLane>,
                       "ForwardSimtKernel", args, work, ka, threads, 0);
    } else if (which == 1) {
      LaunchPerPattern(GradQuerySimtKernel<T, A, O, kPerLane>,
                       "GradQuerySimtKernel", args, work, ka, threads, 0);
    } else {
      LaunchPerPattern(GradKeyValueSimtKernel<T, A, O, kPerLane>,
                       "GradKeyValueSimtKernel", args, work, ka, threads, 0);
    }
  }
};

void LaunchSimt(const CudaAttentionArgs& args, const CudaWorkList& work,
                const KernelArgs& ka, int which) {
  DispatchTypes(args.dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    if constexpr (std::is_same<T, bf16>::value) {
      if (args.out_dtype == DType::kBFloat16) {
        DispatchPerLane(args.head_dim,
                        SimtLaunch<T, A, bf16>{args, work, ka, which});
        return;
      }
    }
    DispatchPerLane(args.head_dim, SimtLaunch<T, A, A>{args, work, ka, which});
  });
}

std::atomic<CudaTensorCoreKernels> tensor_core_kernels{
    CudaTensorCoreKernels::kMmaSync};

// Whether `device` runs the Hopper kernels (attention_sm90.cuh): asked for,
// and compute capability 9.0 (their machine code is sm_90a's).
bool UsesSm90Kernels(int device) {
  if (tensor_core_kernels.load() != CudaTensorCoreKernels::kWgmma) {
    return false;
  }
  int major = 0, minor = 0;
  LC_CUDA_CHECK(cudaDeviceGetAttribute(
      &major, cudaDevAttrComputeCapabilityMajor, device));
  LC_CUDA_CHECK(cudaDeviceGetAttribute(
      &minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
}

void CheckArgs(const CudaAttentionArgs& args) {
  LC_CHECK(args.head_dim >= 1 && args.head_dim <= kCudaMaxHeadDim)
      << "head_dim " << args.head_dim;
  LC_CHECK(args.batch >= 1 && args.batch <= 65535) << "batch " << args.batch;
  LC_CHECK(args.n < (int64_t{1} << 31)) << "n " << args.n;
  const DType acc =
      args.dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  LC_CHECK(args.out_dtype == acc ||
           (args.dtype == DType::kBFloat16 &&
            args.out_dtype == DType::kBFloat16 && args.max_patterns == 1))
      << "outputs of " << DTypeName(args.out_dtype) << " for inputs of "
      << DTypeName(args.dtype) << " with " << args.max_patterns
      << " patterns per head";
  SetCudaDevice(args.device);
}

}  // namespace

void LaunchAttentionForward(const CudaAttentionArgs& args,
                            const CudaWorkList& query_items, const void* q,
                            const void* k, const void* v, void* out_acc,
                            void* lse_acc) {
  CheckArgs(args);
  KernelArgs ka = MakeKernelArgs(args, query_items);
  ka.q = q;
  ka.k = k;
  ka.v = v;
  ka.out_acc = out_acc;
  ka.lse_acc = lse_acc;
  const bool mma = DispatchMma(args, {q, k, v, out_acc}, [&](auto d, auto out) {
    constexpr int D = decltype(d)::value;
    using OutT = decltype(out);
    if (UsesSm90Kernels(args.device)) {
      ForwardTensorCore<Wgmma, D, OutT>(args, query_items, ka);
    } else {
      ForwardTensorCore<MmaSync, D, OutT>(args, query_items, ka);
    }
  });
  if (!mma) LaunchSimt(args, query_items, ka, 0);
}

void LaunchAttentionBackward(const CudaAttentionArgs& args,
                             const CudaWorkList& query_items,
                             const CudaWorkList& key_items, const void* q,
                             const void* k, const void* v, const void* grad_out,
                             const void* lse, const void* delta,
                             const void* grad_lse, void* dq_acc, void* dk_acc,
                             void* dv_acc) {
  CheckArgs(args);
  KernelArgs query_args = MakeKernelArgs(args, query_items);
  query_args.q = q;
  query_args.k = k;
  query_args.v = v;
  query_args.grad_out = grad_out;
  query_args.lse = lse;
  query_args.delta = delta;
  query_args.grad_lse = grad_lse;
  query_args.dq = dq_acc;
  query_args.dk = dk_acc;
  query_args.dv = dv_acc;
  KernelArgs key_args = query_args;
  key_args.tiles = key_items.tiles;
  const bool mma =
      DispatchMma(args, {q, k, v, grad_out, dq_acc, dk_acc, dv_acc},
                  [&](auto d, auto grad) {
                    constexpr int D = decltype(d)::value;
                    using GradT = decltype(grad);
                    if (UsesSm90Kernels(args.device)) {
                      BackwardTensorCore<Wgmma, D, GradT>(
                          args, query_items, key_items, query_args, key_args);
                    } else {
                      BackwardTensorCore<MmaSync, D, GradT>(
                          args, query_items, key_items, query_args, key_args);
                    }
                  });
  if (mma) return;
  LaunchSimt(args, query_items, query_args, 1);
  LaunchSimt(args, key_items, key_args, 2);
}

void SetCudaTensorCoreKernels(CudaTensorCoreKernels kernels) {
  tensor_core_kernels.store(kernels);
}

CudaTensorCoreKernels GetCudaTensorCoreKernels() {
  return tensor_core_kernels.load();
}

void LaunchRowDelta(DType dtype, int device, int64_t batch, int64_t rows,
                    int64_t heads, int64_t head_dim, const void* out,
                    const void* grad_out, void* delta) {
  const int64_t warps = batch * rows * heads;
  if (warps == 0) return;
  SetCudaDevice(device);
  cudaStream_t stream = CurrentCudaStream(device);
  const int threads = 256;
  const int64_t blocks =
      std::min<int64_t>((warps * 32 + threads - 1) / threads, 65535 * 8);
  DispatchTypes(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    RowDeltaKernel<T, A><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<const T*>(out), static_cast<const T*>(grad_out),
        static_cast<A*>(delta), batch, rows, heads, static_cast<int>(head_dim));
    LC_CUDA_CHECK_LAUNCH("RowDeltaKernel");
  });
}

}  // namespace lc
