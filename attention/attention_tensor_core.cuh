// The tensor-core kernels of the partial-attention primitive (bfloat16,
// head_dim 64 or 128), written once over a tensor-core policy (NOTE
// [ Tensor-core policies ]) and instantiated for mma.sync by attention_cuda.cu
// and for Hopper's wgmma by attention_sm90.cu: the fused forward (online
// softmax, merged into float32 accumulators or written in bfloat16), dQ over
// query items and dK/dV over key items (no atomics: bit-identical results
// for equal inputs), with their tile shapes and launchers. Internal to
// attention/; nvcc only.
#ifndef LONGCTX_ATTENTION_ATTENTION_TENSOR_CORE_CUH_
#define LONGCTX_ATTENTION_ATTENTION_TENSOR_CORE_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention/attention_cuda.h"
#include "attention/attention_cuda_kernel.cuh"

namespace lc {
namespace attention_cuda {

// ---------------------------------------------------------------------------
// Tensor-core forward: one block per (query item, batch index). Each of
// kWarps warps owns 16 kMTiles query rows; the block walks the item's keys in
// chunks of kBlockN, double-buffered. Chunks that need no mask (whole, not
// on the causal diagonal, no padding) take no per-element branch.
// q: [batch, q_rows, heads, D] bf16; k, v: [batch, k_rows, heads, D] bf16;
// out_acc: [batch, q_rows, heads, D] of OutT and lse_acc: [batch, heads,
// q_rows] float32: merged into (OutT float) or written (OutT bf16).
template <typename Mma, int D, int kWarps, int kMTiles, int kBlockN,
          typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
    ForwardMmaKernel(const KernelArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = kWarps * kMTiles * 16;
  constexpr int kNTiles = kBlockN / 8;
  static_assert(kBlockM == kCudaQueryTileRows, "query items are the block");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = AlignTiles<Mma>(smem_raw);
  bf16* q_tile = reinterpret_cast<bf16*>(smem);
  bf16* k_tiles = q_tile + kBlockM * D;       // [2][kBlockN * D]
  bf16* v_tiles = k_tiles + 2 * kBlockN * D;  // [2][kBlockN * D]

  const CudaWorkItem item = a.items[blockIdx.x];
  const CudaTileRows qt = item.rows;
  const int64_t b = blockIdx.y;
  const int64_t q_pitch = a.q_row_stride, k_pitch = a.k_row_stride;
  const bf16* q_head =
      static_cast<const bf16*>(a.q) + QueryOffset(a, b, item.head);
  const bf16* k_head =
      static_cast<const bf16*>(a.k) + KeyOffset(a, b, item.head);
  const bf16* v_head =
      static_cast<const bf16*>(a.v) + KeyOffset(a, b, item.head);

  LoadTileAsync<Mma, kBlockM, D, kThreads>(q_tile, q_head, q_pitch, qt.row,
                                           qt.row_step, qt.count);
  CpAsyncCommit();
  ChunkCursor<kBlockN, true> chunk;
  chunk.Begin(a.tiles, item.first, item.last, PositionOf(qt, qt.count - 1),
              a.causal);
  LoadTileAsync<Mma, kBlockN, D, kThreads>(k_tiles, k_head, k_pitch,
                                           chunk.FirstRow(),
                                           chunk.tile.row_step, chunk.Rows());
  LoadTileAsync<Mma, kBlockN, D, kThreads>(v_tiles, v_head, k_pitch,
                                           chunk.FirstRow(),
                                           chunk.tile.row_step, chunk.Rows());
  CpAsyncCommit();

  const int row0 = (threadIdx.x >> 5) * kMTiles * 16;
  const float scale_log2 = a.scale_log2;
  const bool dropout = a.dropout > 0;
  const uint64_t stream = DropoutStream(a, b, item);
  const float keep_scale = static_cast<float>(1.0 / (1.0 - a.dropout));
  float o[kMTiles][D / 8][4];
  Zero(o);
  float m[kMTiles][2], l[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.f;
  }

  for (int buf = 0;; buf ^= 1) {
    const bf16* k_tile = k_tiles + buf * kBlockN * D;
    const bf16* v_tile = v_tiles + buf * kBlockN * D;
    const int valid = chunk.Rows();
    const int k_first = chunk.FirstPosition();
    const int k_step = chunk.tile.position_step;
    const bool masked = valid < kBlockN ||
                        (a.causal && chunk.LastPosition() > qt.position) ||
                        a.key_padding != nullptr;
    chunk.Next();
    const bool more = chunk.Valid();
    if (more) {
      LoadTileAsync<Mma, kBlockN, D, kThreads>(
          k_tiles + (buf ^ 1) * kBlockN * D, k_head, k_pitch, chunk.FirstRow(),
          chunk.tile.row_step, chunk.Rows());
      LoadTileAsync<Mma, kBlockN, D, kThreads>(
          v_tiles + (buf ^ 1) * kBlockN * D, v_head, k_pitch, chunk.FirstRow(),
          chunk.tile.row_step, chunk.Rows());
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    Mma::AfterTileWrites();
    __syncthreads();

    float s[kMTiles][kNTiles][4];
    Zero(s);
    Mma::template GemmABt<D, kMTiles, kNTiles, kBlockM>(s, q_tile, row0,
                                                        k_tile);
    ForEachElement(s, row0, [&](int, int, int, float& x) { x *= scale_log2; });
    if (masked) {
      ForEachElement(s, row0, [&](int r, int c, int, float& x) {
        if (c >= valid ||
            !PairAllowed(a, b, PositionOf(qt, r), k_first + c * k_step)) {
          x = -INFINITY;
        }
      });
    }
    OnlineSoftmax(s, m, l, o);
    if (dropout) {
      ForEachElement(s, row0, [&](int r, int c, int, float& p) {
        p = DropoutKeeps(a, stream, PositionOf(qt, r), k_first + c * k_step)
                ? p * keep_scale
                : 0.f;
      });
    }
    uint32_t p[kMTiles][kNTiles / 2][4];
    ToAFragments(s, p);
    Mma::template GemmAB<D, kMTiles, kNTiles / 2>(o, p, v_tile);
    __syncthreads();
    if (!more) break;
  }

  StoreForwardRows<D, kMTiles, OutT>(a, b, item, row0, o, m, l);
}

// Row statistics of a query row for the backward, in base 2: p = 2^(s *
// scale_log2 - lse2) (lse2 = +inf for a row with no key or past the tile,
// so its p is 0), ds = p * (dp - dd) with dd = delta - dlse.
__device__ __forceinline__ void RowStats(const KernelArgs& a, int64_t stat,
                                         bool valid, float* lse2, float* dd) {
  *lse2 = INFINITY;
  *dd = 0.f;
  if (!valid) return;
  const float lse = static_cast<const float*>(a.lse)[stat];
  if (lse != -INFINITY) *lse2 = lse * kLog2e;
  *dd = static_cast<const float*>(a.delta)[stat] -
        static_cast<const float*>(a.grad_lse)[stat];
}

// Tensor-core dQ: one block per (query item, batch index); each warp owns 16
// query rows and walks the item's keys in chunks of kBlockN:
// dq += scale * ds k with ds = p * (dp - delta + dlse), p = exp(s - lse),
// dp = do v^T (times the dropout mask). q, grad_out: [batch, q_rows, heads,
// D] bf16; k, v: [batch, k_rows, heads, D] bf16; lse, delta, grad_lse:
// [batch, heads, q_rows] float32; dq: [batch, q_rows, heads, D] of GradT,
// added into (float) or written (bf16).
template <typename Mma, int D, int kWarps, int kBlockN, typename GradT>
__global__ void __launch_bounds__(kWarps * 32)
    GradQueryMmaKernel(const KernelArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = kWarps * 16;
  constexpr int kNTiles = kBlockN / 8;
  static_assert(kBlockM == kCudaQueryTileRows, "query items are the block");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = AlignTiles<Mma>(smem_raw);
  bf16* q_tile = reinterpret_cast<bf16*>(smem);
  bf16* g_tile = q_tile + kBlockM * D;
  bf16* k_tiles = g_tile + kBlockM * D;       // [2][kBlockN * D]
  bf16* v_tiles = k_tiles + 2 * kBlockN * D;  // [2][kBlockN * D]

  const CudaWorkItem item = a.items[blockIdx.x];
  const CudaTileRows qt = item.rows;
  const int64_t b = blockIdx.y;
  const int64_t q_pitch = a.q_row_stride, k_pitch = a.k_row_stride;
  const int64_t q_offset = QueryOffset(a, b, item.head);
  const int64_t k_offset = KeyOffset(a, b, item.head);
  const bf16* k_head = static_cast<const bf16*>(a.k) + k_offset;
  const bf16* v_head = static_cast<const bf16*>(a.v) + k_offset;

  LoadTileAsync<Mma, kBlockM, D, kThreads>(
      q_tile, static_cast<const bf16*>(a.q) + q_offset, q_pitch, qt.row,
      qt.row_step, qt.count);
  LoadTileAsync<Mma, kBlockM, D, kThreads>(
      g_tile, static_cast<const bf16*>(a.grad_out) + q_offset, q_pitch, qt.row,
      qt.row_step, qt.count);
  CpAsyncCommit();
  ChunkCursor<kBlockN, true> chunk;
  chunk.Begin(a.tiles, item.first, item.last, PositionOf(qt, qt.count - 1),
              a.causal);
  LoadTileAsync<Mma, kBlockN, D, kThreads>(k_tiles, k_head, k_pitch,
                                           chunk.FirstRow(),
                                           chunk.tile.row_step, chunk.Rows());
  LoadTileAsync<Mma, kBlockN, D, kThreads>(v_tiles, v_head, k_pitch,
                                           chunk.FirstRow(),
                                           chunk.tile.row_step, chunk.Rows());
  CpAsyncCommit();

  const int row0 = (threadIdx.x >> 5) * 16;
  const float scale_log2 = a.scale_log2;
  const bool dropout = a.dropout > 0;
  const uint64_t stream = DropoutStream(a, b, item);
  const float keep_scale = static_cast<float>(1.0 / (1.0 - a.dropout));
  float lse2[2], dd[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + FragmentRow(0, 2 * half);
    RowStats(a,
             (b * a.heads + item.head) * a.q_rows + qt.row +
                 static_cast<int64_t>(min(r, qt.count - 1)) * qt.row_step,
             r < qt.count, &lse2[half], &dd[half]);
  }
  float dq[1][D / 8][4];
  Zero(dq);

  for (int buf = 0;; buf ^= 1) {
    const bf16* k_tile = k_tiles + buf * kBlockN * D;
    const bf16* v_tile = v_tiles + buf * kBlockN * D;
    const int valid = chunk.Rows();
    const int k_first = chunk.FirstPosition();
    const int k_step = chunk.tile.position_step;
    const bool masked = valid < kBlockN ||
                        (a.causal && chunk.LastPosition() > qt.position) ||
                        a.key_padding != nullptr;
    chunk.Next();
    const bool more = chunk.Valid();
    if (more) {
      LoadTileAsync<Mma, kBlockN, D, kThreads>(
          k_tiles + (buf ^ 1) * kBlockN * D, k_head, k_pitch, chunk.FirstRow(),
          chunk.tile.row_step, chunk.Rows());
      LoadTileAsync<Mma, kBlockN, D, kThreads>(
          v_tiles + (buf ^ 1) * kBlockN * D, v_head, k_pitch, chunk.FirstRow(),
          chunk.tile.row_step, chunk.Rows());
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    Mma::AfterTileWrites();
    __syncthreads();

    float s[1][kNTiles][4], dp[1][kNTiles][4];
    Zero(s);
    Zero(dp);
    Mma::template GemmABt<D, 1, kNTiles, kBlockM>(s, q_tile, row0, k_tile);
    Mma::template GemmABt<D, 1, kNTiles, kBlockM>(dp, g_tile, row0, v_tile);
    ForEachElement(s, row0, [&](int, int, int slot, float& x) {
      x = Exp2(fmaf(x, scale_log2, -lse2[slot]));
    });
    if (masked) {
      ForEachElement(s, row0, [&](int r, int c, int, float& p) {
        if (c >= valid ||
            !PairAllowed(a, b, PositionOf(qt, r), k_first + c * k_step)) {
          p = 0.f;
        }
      });
    }
    if (dropout) {
      ForEachElement(dp, row0, [&](int r, int c, int, float& g) {
        g = DropoutKeeps(a, stream, PositionOf(qt, r), k_first + c * k_step)
                ? g * keep_scale
                : 0.f;
      });
    }
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][ni][e] *= dp[0][ni][e] - dd[e >> 1];
    }
    uint32_t ds[1][kNTiles / 2][4];
    ToAFragments(s, ds);
    Mma::template GemmAB<D, 1, kNTiles / 2>(dq, ds, k_tile);
    __syncthreads();
    if (!more) break;
  }

  GradT* dq_head = static_cast<GradT*>(a.dq) + q_offset;
  const float scale = static_cast<float>(a.scale);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + FragmentRow(0, 2 * half);
    if (r >= qt.count) continue;
    GradT* row =
        dq_head + (qt.row + static_cast<int64_t>(r) * qt.row_step) * q_pitch;
#pragma unroll
    for (int di = 0; di < D / 8; ++di) {
      AddOrStore2(row + FragmentCol(di, 0), scale * dq[0][di][2 * half],
                  scale * dq[0][di][2 * half + 1]);
    }
  }
}

// Tensor-core dK and dV: one block per (key item, batch index); each warp
// owns 16 keys and walks the item's queries in chunks of kQChunk, computing
// the transposed tiles s^T = k q^T and dp^T = v do^T so that p^T and ds^T
// feed the next products from registers: dv += p_dropped^T do,
// dk += scale * ds^T q. Buffers as in GradQueryMmaKernel; dk, dv:
// [batch, k_rows, heads, D] of GradT, added into (float) or written (bf16).
template <typename Mma, int D, int kWarps, int kQChunk, typename GradT>
__global__ void __launch_bounds__(kWarps * 32)
    GradKeyValueMmaKernel(const KernelArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockN = kWarps * 16;
  constexpr int kNTiles = kQChunk / 8;
  static_assert(kBlockN == kCudaKeyTileRows, "key items are the block");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = AlignTiles<Mma>(smem_raw);
  bf16* k_tile = reinterpret_cast<bf16*>(smem);
  bf16* v_tile = k_tile + kBlockN * D;
  bf16* q_tiles = v_tile + kBlockN * D;       // [2][kQChunk * D]
  bf16* g_tiles = q_tiles + 2 * kQChunk * D;  // [2][kQChunk * D]
  float* lse2_rows = reinterpret_cast<float*>(g_tiles + 2 * kQChunk * D);
  float* dd_rows = lse2_rows + 2 * kQChunk;  // [2][kQChunk] each

  const CudaWorkItem item = a.items[blockIdx.x];
  const CudaTileRows kt = item.rows;
  const int64_t b = blockIdx.y;
  const int64_t q_pitch = a.q_row_stride, k_pitch = a.k_row_stride;
  const int64_t q_offset = QueryOffset(a, b, item.head);
  const int64_t k_offset = KeyOffset(a, b, item.head);
  const bf16* q_head = static_cast<const bf16*>(a.q) + q_offset;
  const bf16* g_head = static_cast<const bf16*>(a.grad_out) + q_offset;
  const int64_t stat_head = (b * a.heads + item.head) * a.q_rows;

  LoadTileAsync<Mma, kBlockN, D, kThreads>(
      k_tile, static_cast<const bf16*>(a.k) + k_offset, k_pitch, kt.row,
      kt.row_step, kt.count);
  LoadTileAsync<Mma, kBlockN, D, kThreads>(
      v_tile, static_cast<const bf16*>(a.v) + k_offset, k_pitch, kt.row,
      kt.row_step, kt.count);
  CpAsyncCommit();
  ChunkCursor<kQChunk, false> chunk;
  chunk.Begin(a.tiles, item.first, item.last, kt.position, a.causal);
  // Loads the cursor's query chunk into buffer `buf`: q and do rows by
  // cp.async, their row statistics by plain stores.
  auto load_chunk = [&](int buf) {
    LoadTileAsync<Mma, kQChunk, D, kThreads>(q_tiles + buf * kQChunk * D,
                                             q_head, q_pitch, chunk.FirstRow(),
                                             chunk.tile.row_step, chunk.Rows());
    LoadTileAsync<Mma, kQChunk, D, kThreads>(g_tiles + buf * kQChunk * D,
                                             g_head, q_pitch, chunk.FirstRow(),
                                             chunk.tile.row_step, chunk.Rows());
    CpAsyncCommit();
    for (int i = threadIdx.x; i < kQChunk; i += kThreads) {
      RowStats(a,
               stat_head + chunk.FirstRow() +
                   static_cast<int64_t>(min(i, chunk.Rows() - 1)) *
                       chunk.tile.row_step,
               i < chunk.Rows(), &lse2_rows[buf * kQChunk + i],
               &dd_rows[buf * kQChunk + i]);
    }
  };
  load_chunk(0);

  const int row0 = (threadIdx.x >> 5) * 16;
  const float scale_log2 = a.scale_log2;
  const bool dropout = a.dropout > 0;
  const uint64_t stream = DropoutStream(a, b, item);
  const float keep_scale = static_cast<float>(1.0 / (1.0 - a.dropout));
  const int k_last = PositionOf(kt, kt.count - 1);
  float dk[1][D / 8][4], dv[1][D / 8][4];
  Zero(dk);
  Zero(dv);

  for (int buf = 0;; buf ^= 1) {
    const bf16* q_tile = q_tiles + buf * kQChunk * D;
    const bf16* g_tile = g_tiles + buf * kQChunk * D;
    const float* lse2 = lse2_rows + buf * kQChunk;
    const float* dd = dd_rows + buf * kQChunk;
    const int q_first = chunk.FirstPosition();
    const int q_step = chunk.tile.position_step;
    // Queries past the chunk need no mask: their lse2 is +inf (p = 0).
    const bool masked =
        (a.causal && q_first < k_last) || a.key_padding != nullptr;
    chunk.Next();
    const bool more = chunk.Valid();
    if (more) {
      load_chunk(buf ^ 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    Mma::AfterTileWrites();
    __syncthreads();

    float st[1][kNTiles][4], dpt[1][kNTiles][4];
    Zero(st);
    Zero(dpt);
    Mma::template GemmABt<D, 1, kNTiles, kBlockN>(st, k_tile, row0, q_tile);
    Mma::template GemmABt<D, 1, kNTiles, kBlockN>(dpt, v_tile, row0, g_tile);
    ForEachElement(st, row0, [&](int, int c, int, float& x) {
      x = Exp2(fmaf(x, scale_log2, -lse2[c]));
    });
    if (masked) {
      ForEachElement(st, row0, [&](int r, int c, int, float& p) {
        if (r >= kt.count ||
            !PairAllowed(a, b, q_first + c * q_step, PositionOf(kt, r))) {
          p = 0.f;
        }
      });
    }
    // ds^T = p^T (dp^T - dd) into dpt; st becomes the p^T that weighs dv.
    if (dropout) {
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = FragmentCol(ni, e);
          const bool keep =
              DropoutKeeps(a, stream, q_first + c * q_step,
                           PositionOf(kt, row0 + FragmentRow(0, e)));
          const float p = st[0][ni][e];
          dpt[0][ni][e] =
              p * ((keep ? dpt[0][ni][e] * keep_scale : 0.f) - dd[c]);
          st[0][ni][e] = keep ? p * keep_scale : 0.f;
        }
      }
    } else {
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dpt[0][ni][e] =
              st[0][ni][e] * (dpt[0][ni][e] - dd[FragmentCol(ni, e)]);
        }
      }
    }
    uint32_t frags[1][kNTiles / 2][4];
    ToAFragments(st, frags);
    Mma::template GemmAB<D, 1, kNTiles / 2>(dv, frags, g_tile);
    ToAFragments(dpt, frags);
    Mma::template GemmAB<D, 1, kNTiles / 2>(dk, frags, q_tile);
    __syncthreads();
    if (!more) break;
  }

  GradT* dk_head = static_cast<GradT*>(a.dk) + k_offset;
  GradT* dv_head = static_cast<GradT*>(a.dv) + k_offset;
  const float scale = static_cast<float>(a.scale);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + FragmentRow(0, 2 * half);
    if (r >= kt.count) continue;
    const int64_t row =
        (kt.row + static_cast<int64_t>(r) * kt.row_step) * k_pitch;
#pragma unroll
    for (int di = 0; di < D / 8; ++di) {
      const int col = FragmentCol(di, 0);
      AddOrStore2(dk_head + row + col, scale * dk[0][di][2 * half],
                  scale * dk[0][di][2 * half + 1]);
      AddOrStore2(dv_head + row + col, dv[0][di][2 * half],
                  dv[0][di][2 * half + 1]);
    }
  }
}

// ---------------------------------------------------------------------------
// Launching.

// Tile shapes of the tensor-core kernels per policy and head_dim. MmaSync:
// chosen so that the
// accumulators fit the 255 registers a thread has (ptxas -v: at most 44
// bytes of spills per thread): the forward keeps 32 rows per warp at head_dim
// 64 (4 warps, 2 blocks per SM) and 16 at 128 (8 warps, where 32 rows spill);
// the forward walks keys in chunks of 64, dQ in chunks of 32 (head_dim 64)
// or 64 (128); dK/dV walk queries in chunks of 64 (head_dim 64) or 32 (128)
// rows. Every kernel holds 8 warps per SM. A sweep of eight shapes on the
// H200 (BENCHMARKS.md) found these the fastest at head_dim 64.
template <typename Mma, int D>
struct TensorCoreShapes;
template <>
struct TensorCoreShapes<MmaSync, 64> {
  static constexpr int kForwardWarps = 4, kForwardMTiles = 2;
  static constexpr int kKeyChunk = 64;
  static constexpr int kGradWarps = 8, kGradKeyChunk = 32, kGradQueryChunk = 64;
};
template <>
struct TensorCoreShapes<MmaSync, 128> {
  static constexpr int kForwardWarps = 8, kForwardMTiles = 1;
  static constexpr int kKeyChunk = 64;
  static constexpr int kGradWarps = 8, kGradKeyChunk = 64, kGradQueryChunk = 32;
};

// Extra dynamic shared memory for AlignTiles.
template <typename Mma>
constexpr size_t kAlignmentSlack = Mma::kTileAlignment - 128;

// The forward and the backward on the tensor-core kernels of policy Mma.
template <typename Mma, int D, typename OutT>
void ForwardTensorCore(const CudaAttentionArgs& args, const CudaWorkList& work,
                       const KernelArgs& ka) {
  using C = TensorCoreShapes<Mma, D>;
  constexpr int kBlockM = C::kForwardWarps * C::kForwardMTiles * 16;
  const size_t smem =
      (kBlockM + 4 * C::kKeyChunk) * D * sizeof(bf16) + kAlignmentSlack<Mma>;
  auto kernel = ForwardMmaKernel<Mma, D, C::kForwardWarps, C::kForwardMTiles,
                                 C::kKeyChunk, OutT>;
  AllowSharedMemory(kernel, smem);
  LaunchPerPattern(kernel, "ForwardMmaKernel", args, work, ka,
                   C::kForwardWarps * 32, smem);
}

template <typename Mma, int D, typename GradT>
void BackwardTensorCore(const CudaAttentionArgs& args,
                        const CudaWorkList& queries, const CudaWorkList& keys,
                        const KernelArgs& query_args,
                        const KernelArgs& key_args) {
  using C = TensorCoreShapes<Mma, D>;
  constexpr int kBlock = C::kGradWarps * 16;
  const size_t q_smem = (2 * kBlock + 4 * C::kGradKeyChunk) * D * sizeof(bf16) +
                        kAlignmentSlack<Mma>;
  auto q_kernel =
      GradQueryMmaKernel<Mma, D, C::kGradWarps, C::kGradKeyChunk, GradT>;
  AllowSharedMemory(q_kernel, q_smem);
  LaunchPerPattern(q_kernel, "GradQueryMmaKernel", args, queries, query_args,
                   C::kGradWarps * 32, q_smem);
  const size_t kv_smem =
      (2 * kBlock + 4 * C::kGradQueryChunk) * D * sizeof(bf16) +
      4 * C::kGradQueryChunk * sizeof(float) + kAlignmentSlack<Mma>;
  auto kv_kernel =
      GradKeyValueMmaKernel<Mma, D, C::kGradWarps, C::kGradQueryChunk, GradT>;
  AllowSharedMemory(kv_kernel, kv_smem);
  LaunchPerPattern(kv_kernel, "GradKeyValueMmaKernel", args, keys, key_args,
                   C::kGradWarps * 32, kv_smem);
}

// Hopper's policy (attention_sm90.cuh). Its launchers are instantiated only
// in attention_sm90.cu, the one file built for sm_90a.
struct Wgmma;
#define LC_TENSOR_CORE_LAUNCHERS(PREFIX, MMA, D, OUT)                     \
  PREFIX template void ForwardTensorCore<MMA, D, OUT>(                    \
      const CudaAttentionArgs&, const CudaWorkList&, const KernelArgs&);  \
  PREFIX template void BackwardTensorCore<MMA, D, OUT>(                   \
      const CudaAttentionArgs&, const CudaWorkList&, const CudaWorkList&, \
      const KernelArgs&, const KernelArgs&);
LC_TENSOR_CORE_LAUNCHERS(extern, Wgmma, 64, float)
LC_TENSOR_CORE_LAUNCHERS(extern, Wgmma, 64, bf16)
LC_TENSOR_CORE_LAUNCHERS(extern, Wgmma, 128, float)
LC_TENSOR_CORE_LAUNCHERS(extern, Wgmma, 128, bf16)
}  // namespace attention_cuda
}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_TENSOR_CORE_CUH_
