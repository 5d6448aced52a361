// Device code shared by the CUDA attention kernels (attention_cuda.cu's FMA
// kernels and the tensor-core kernels of attention_tensor_core.cuh): the
// arguments every kernel gets, the pair rule (causality, padding, dropout),
// the overflow-safe merge, tile loads, the mma.sync policy (NOTE
// [ Tensor-core policies ]), the fragment helpers, the online softmax, the
// chunk walk over a work item's tiles, the forward's epilogue and the
// per-pattern launch. Internal to attention/; nvcc only.
#ifndef LONGCTX_ATTENTION_ATTENTION_CUDA_KERNEL_CUH_
#define LONGCTX_ATTENTION_ATTENTION_CUDA_KERNEL_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/attention_cuda.h"
#include "core/check.h"
#include "core/cuda.h"
#include "core/philox.h"

namespace lc {
namespace attention_cuda {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// What every kernel gets, by value.
struct KernelArgs {
  int64_t n = 0, heads = 0, head_dim = 0, q_rows = 0;
  int64_t max_patterns = 1;
  // Buffer strides in elements (CudaAttentionArgs): row r of head h of batch
  // b starts at b * batch_stride + r * row_stride + h * head_stride.
  int64_t q_batch_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  double scale = 1;
  float scale_log2 = 1;  // scale * log2(e), for the tensor-core kernels
  bool causal = false;
  const uint8_t* key_padding = nullptr;  // [batch, n] or null
  double dropout = 0;
  uint64_t dropout_seed = 0, dropout_offset = 0;
  const CudaWorkItem* items = nullptr;  // this launch's items
  const CudaTileRows* tiles = nullptr;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* grad_out = nullptr;
  const void* lse = nullptr;  // backward: the final lse
  const void* delta = nullptr;
  const void* grad_lse = nullptr;
  void* out_acc = nullptr;  // forward
  void* lse_acc = nullptr;
  void* dq = nullptr;  // backward
  void* dk = nullptr;
  void* dv = nullptr;
};

// ---------------------------------------------------------------------------
// The pair rule, shared by every kernel.

// Whether query position t of batch b may attend key position u beyond the
// pattern that chose their tile: causality and key padding. (Block masks are
// whole tiles: the plan leaves out the tiles of blocks that are off.)
__device__ __forceinline__ bool PairAllowed(const KernelArgs& a, int64_t b,
                                            int t, int u) {
  if (a.causal && u > t) return false;
  return a.key_padding == nullptr || a.key_padding[b * a.n + u] == 0;
}

// The dropout stream of (batch, head, pattern), as on the CPU.
__device__ __forceinline__ uint64_t DropoutStream(const KernelArgs& a,
                                                  int64_t b,
                                                  const CudaWorkItem& item) {
  return static_cast<uint64_t>((b * a.heads + item.head) * a.max_patterns +
                               item.pattern);
}

// Whether dropout keeps pair (t, u): the CPU primitive's draw, compared in
// double as it does.
__device__ __forceinline__ bool DropoutKeeps(const KernelArgs& a,
                                             uint64_t stream, int t, int u) {
  return static_cast<double>(AttentionDropoutUniform(
             a.dropout_seed, a.dropout_offset, stream,
             static_cast<uint64_t>(a.n), static_cast<uint64_t>(t),
             static_cast<uint64_t>(u))) >= a.dropout;
}

// Element offsets of head h of batch b in the query-side buffers (q,
// grad_out, out, dq) and the key-side buffers (k, v, dk, dv).
__device__ __forceinline__ int64_t QueryOffset(const KernelArgs& a, int64_t b,
                                               int h) {
  return b * a.q_batch_stride + h * a.head_dim;
}
__device__ __forceinline__ int64_t KeyOffset(const KernelArgs& a, int64_t b,
                                             int h) {
  return b * a.k_batch_stride + h * a.k_head_stride;
}

// ---------------------------------------------------------------------------
// Math in the accumulator type (float or double).

__device__ __forceinline__ float Exp(float x) { return expf(x); }
__device__ __forceinline__ double Exp(double x) { return exp(x); }
__device__ __forceinline__ float Log(float x) { return logf(x); }
__device__ __forceinline__ double Log(double x) { return log(x); }
__device__ __forceinline__ float Log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double Log1p(double x) { return log1p(x); }
__device__ __forceinline__ float Abs(float x) { return fabsf(x); }
__device__ __forceinline__ double Abs(double x) { return fabs(x); }

template <typename A>
__device__ __forceinline__ A NegInf() {
  return -static_cast<A>(INFINITY);
}

// The overflow-safe merge of a partial (o2, lse2) into (o1, lse1): o1 <-
// replace ? o2 : o1 + weight * (o2 - o1), lse1 <- lse. lse1 = -inf marks an
// empty accumulator (then o2 replaces it); lse2 is not -inf. Equal sides
// weigh one half each, which keeps two +inf sides (rows with a +inf score,
// o NaN) at +inf, as partial_attention.cc's MergeAttentionRow does.
template <typename A>
struct Merge {
  A weight;
  A lse;
  bool replace;
  __device__ __forceinline__ A Apply(A o1, A o2) const {
    return replace ? o2 : o1 + weight * (o2 - o1);
  }
};

template <typename A>
__device__ __forceinline__ Merge<A> MergeOf(A lse1, A lse2) {
  if (lse1 == NegInf<A>()) return {A(1), lse2, true};
  const A diff = lse2 == lse1 ? A(0) : lse2 - lse1;
  const A e = Exp(-Abs(diff));  // sigmoid and softplus without overflow
  const A weight = diff >= 0 ? A(1) / (A(1) + e) : e / (A(1) + e);
  return {weight, lse1 + (diff > 0 ? diff : A(0)) + Log1p(e), false};
}

// Adds v into an accumulator element, or, for bfloat16 outputs (written
// once, see CudaAttentionArgs::out_dtype), stores it.
__device__ __forceinline__ void AddOrStore(float* at, float v) { *at += v; }
__device__ __forceinline__ void AddOrStore(double* at, double v) { *at += v; }
__device__ __forceinline__ void AddOrStore(bf16* at, float v) {
  *at = __float2bfloat16_rn(v);
}
// The same for two adjacent elements (`at` 8-byte aligned for float, 4-byte
// for bf16).
__device__ __forceinline__ void AddOrStore2(float* at, float x, float y) {
  float2* p = reinterpret_cast<float2*>(at);
  float2 cur = *p;
  cur.x += x;
  cur.y += y;
  *p = cur;
}
__device__ __forceinline__ void AddOrStore2(bf16* at, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(at) = __floats2bfloat162_rn(x, y);
}

// A stored element in the accumulator type.
template <typename A>
__device__ __forceinline__ A ToAcc(float x) {
  return static_cast<A>(x);
}
template <typename A>
__device__ __forceinline__ A ToAcc(double x) {
  return static_cast<A>(x);
}
template <typename A>
__device__ __forceinline__ A ToAcc(bf16 x) {
  return static_cast<A>(__bfloat162float(x));
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// ---------------------------------------------------------------------------
// Tensor-core building blocks.

__device__ __forceinline__ uint32_t SmemAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-fills when !valid.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src,
                                          bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Starts copying rows first_row, first_row + step, ... (valid_rows of them,
// at most kRows) of one head into a [kRows, D] tile in Mma's layout; the rows
// past valid_rows are zero-filled. Row i of the head starts at head + i *
// pitch.
template <typename Mma, int kRows, int D, int kThreads>
__device__ __forceinline__ void LoadTileAsync(bf16* tile, const bf16* head,
                                              int64_t pitch, int first_row,
                                              int step, int valid_rows) {
  constexpr int kChunks = D / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "tile load split");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int index = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = index / kChunks, c = index % kChunks;
    const bool valid = r < valid_rows;
    const bf16* src =
        valid
            ? head + static_cast<int64_t>(first_row + r * step) * pitch + c * 8
            : head;
    CpAsync16(SmemAddress(tile + Mma::template TileOffset<kRows, D>(r, c)), src,
              valid);
  }
}

// The first Mma::kTileAlignment-aligned byte at or after `raw` (dynamic
// shared memory, itself 128-byte aligned): launches add
// Mma::kTileAlignment - 128 bytes for the difference.
template <typename Mma>
__device__ __forceinline__ unsigned char* AlignTiles(unsigned char* raw) {
  static_assert(Mma::kTileAlignment % 128 == 0, "dynamic smem is 128-aligned");
  const uint32_t address = SmemAddress(raw);
  const uint32_t aligned = (address + Mma::kTileAlignment - 1) &
                           ~static_cast<uint32_t>(Mma::kTileAlignment - 1);
  return raw + (aligned - address);
}

// NOTE [ Tensor-core policies ]
// The tensor-core kernels (attention_tensor_core.cuh) are written once over
// a policy Mma that owns the shared-memory tile layout and the two products:
//   kTileAlignment             bytes every tile starts on
//   TileOffset<kRows, D>(r, c) element offset of 16-byte chunk c of row r
//                              of a [kRows, D] bfloat16 tile
//   AfterTileWrites()          what a thread issues after its cp.async
//                              writes landed and before the barrier
//   GemmABt<D, kMTiles, kNTiles, kARows>(acc, a, a_row0, b)
//       acc += A[a_row0 .., :] B^T: the warp's 16 kMTiles rows of the
//       [kARows, D] tile A against the 8 kNTiles rows of tile B
//   GemmAB<D, kMTiles, kKSteps>(acc, p, b)
//       acc += P B: P [16 kMTiles, 16 kKSteps] in A fragments (registers),
//       B the [16 kKSteps, D] tile
// Accumulators are C fragments: element e of acc[mi][ni] is row 16 mi +
// lane / 4 + 8 (e / 2), column 8 ni + 2 (lane % 4) + e % 2 of the warp's
// rows. MmaSync (here) runs mma.sync m16n8k16 on any GPU since sm_80; Wgmma
// (attention_sm90.cuh) runs Hopper's warpgroup MMA, one warpgroup's 64 rows
// per instruction, and needs kMTiles == 1 and whole warpgroups.
struct MmaSync {
  static constexpr int kTileAlignment = 128;

  // Element offset of (row, 16-byte chunk) in a [rows, D] bfloat16 tile in
  // shared memory whose chunks are swizzled by chunk ^ (row % 8): the 8 rows
  // an ldmatrix phase reads at one logical chunk fall in 8 distinct banks.
  template <int D>
  static __device__ __forceinline__ int Swizzle(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
  }

  template <int kRows, int D>
  static __device__ __forceinline__ int TileOffset(int row, int chunk) {
    return Swizzle<D>(row, chunk);
  }

  static __device__ __forceinline__ void AfterTileWrites() {}

  static __device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4],
                                                    uint32_t addr) {
    asm volatile(
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
        : "r"(addr));
  }
  static __device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4],
                                                         uint32_t addr) {
    asm volatile(
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, "
        "[%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
        : "r"(addr));
  }

  // c += a (16x16 bfloat16, row major) * b (16x8 bfloat16, column major).
  static __device__ __forceinline__ void Mma16816(float (&c)[4],
                                                  const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }

  // acc[mi][ni] += A[a_row0 + 16 mi .., :] * B[8 ni .., :]^T for swizzled
  // [rows, D] bfloat16 tiles A and B in shared memory: the warp's 16 kMTiles
  // rows of A against 8 kNTiles rows of B. C fragment element e of (mi, ni)
  // is row 16 mi + lane / 4 + 8 (e / 2), column 8 ni + 2 (lane % 4) + e % 2.
  // (kARows, the A tile's rows, is the layout's business: unused here.)
  template <int D, int kMTiles, int kNTiles, int kARows>
  static __device__ __forceinline__ void GemmABt(
      float (&acc)[kMTiles][kNTiles][4], const bf16* a_tile, int a_row0,
      const bf16* b_tile) {
    static_assert(kNTiles % 2 == 0, "B rows come in pairs of 8");
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        const int row = a_row0 + mi * 16 + (lane & 15);
        LdMatrixX4(a[mi],
                   SmemAddress(a_tile + Swizzle<D>(row, 2 * ks + (lane >> 4))));
      }
#pragma unroll
      for (int nj = 0; nj < kNTiles / 2; ++nj) {
        uint32_t b[4];
        const int row = nj * 16 + ((lane >> 4) << 3) + (lane & 7);
        LdMatrixX4(b, SmemAddress(b_tile +
                                  Swizzle<D>(row, 2 * ks + ((lane >> 3) & 1))));
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          Mma16816(acc[mi][2 * nj], a[mi], b[0], b[1]);
          Mma16816(acc[mi][2 * nj + 1], a[mi], b[2], b[3]);
        }
      }
    }
  }

  // acc[mi][di] += P * B[0 .. 16 kKSteps, :] for P a [16 kMTiles, 16 kKSteps]
  // bfloat16 matrix held as A fragments (p[mi][kk]) and B a swizzled [rows, D]
  // bfloat16 tile in shared memory (read transposed by ldmatrix).
  template <int D, int kMTiles, int kKSteps>
  static __device__ __forceinline__ void GemmAB(
      float (&acc)[kMTiles][D / 8][4], const uint32_t (&p)[kMTiles][kKSteps][4],
      const bf16* b_tile) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int dj = 0; dj < D / 16; ++dj) {
        uint32_t b[4];
        const int row = kk * 16 + (lane & 15);
        LdMatrixX4Trans(
            b, SmemAddress(b_tile + Swizzle<D>(row, 2 * dj + (lane >> 4))));
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          Mma16816(acc[mi][2 * dj], p[mi][kk], b[0], b[1]);
          Mma16816(acc[mi][2 * dj + 1], p[mi][kk], b[2], b[3]);
        }
      }
    }
  }
};

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// C fragments of a [16 kMTiles, 8 kNTiles] float tile -> A fragments of the
// same tile in bfloat16 (16 columns per k step).
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void ToAFragments(
    const float (&c)[kMTiles][kNTiles][4],
    uint32_t (&a)[kMTiles][kNTiles / 2][4]) {
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int kk = 0; kk < kNTiles / 2; ++kk) {
      a[mi][kk][0] = PackBf16(c[mi][2 * kk][0], c[mi][2 * kk][1]);
      a[mi][kk][1] = PackBf16(c[mi][2 * kk][2], c[mi][2 * kk][3]);
      a[mi][kk][2] = PackBf16(c[mi][2 * kk + 1][0], c[mi][2 * kk + 1][1]);
      a[mi][kk][3] = PackBf16(c[mi][2 * kk + 1][2], c[mi][2 * kk + 1][3]);
    }
  }
}

template <int kMTiles, int kNTiles>
__device__ __forceinline__ void Zero(float (&c)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) c[mi][ni][e] = 0.f;
    }
  }
}

// 2^x on the special-function unit, flushing results below 2^-126 to 0
// (as the CPU flushes probabilities below the smallest normal float).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Row and column of element e of C fragment (mi, ni) of this lane, in a
// [16 kMTiles, 8 kNTiles] tile.
__device__ __forceinline__ int FragmentRow(int mi, int e) {
  return mi * 16 + ((threadIdx.x & 31) >> 2) + 8 * (e >> 1);
}
__device__ __forceinline__ int FragmentCol(int ni, int e) {
  return ni * 8 + 2 * (threadIdx.x & 3) + (e & 1);
}

// Calls fn(row0 + row, col, slot, x) for every element x of this lane's C
// fragments of a [16 kMTiles, 8 kNTiles] tile; slot = 2 mi + e / 2 numbers
// the lane's 2 kMTiles rows (for per-row values held in registers).
template <int kMTiles, int kNTiles, typename Fn>
__device__ __forceinline__ void ForEachElement(float (&x)[kMTiles][kNTiles][4],
                                               int row0, Fn&& fn) {
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        fn(row0 + FragmentRow(mi, e), FragmentCol(ni, e), 2 * mi + (e >> 1),
           x[mi][ni][e]);
      }
    }
  }
}

// Position of row r of a tile, clamped to its last row (rows past the tile
// are computed but never written; clamping keeps their positions in range).
__device__ __forceinline__ int PositionOf(const CudaTileRows& t, int r) {
  return t.position + (r < t.count ? r : t.count - 1) * t.position_step;
}

// One step of the online softmax for the rows of this lane: s holds scores
// in base 2 (-inf where masked); m, l the running max and this lane's part
// of the running sum; o the running output, rescaled here. s becomes p =
// 2^(s - m).
template <int kMTiles, int kNTiles, int kDTiles>
__device__ __forceinline__ void OnlineSoftmax(float (&s)[kMTiles][kNTiles][4],
                                              float (&m)[kMTiles][2],
                                              float (&l)[kMTiles][2],
                                              float (&o)[kMTiles][kDTiles][4]) {
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float row_max = m[mi][half];
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
        row_max =
            fmaxf(row_max, fmaxf(s[mi][ni][2 * half], s[mi][ni][2 * half + 1]));
      }
      row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
      row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
      // A row with no allowed key so far keeps m = -inf; 0 then stands in
      // for it so that no -inf - -inf appears.
      const float base = row_max == -INFINITY ? 0.f : row_max;
      const float correction = Exp2(m[mi][half] - base);
      m[mi][half] = row_max;
      float sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[mi][ni][e] = Exp2(s[mi][ni][e] - base);
          sum += s[mi][ni][e];
        }
      }
      l[mi][half] = l[mi][half] * correction + sum;
#pragma unroll
      for (int di = 0; di < kDTiles; ++di) {
        o[mi][di][2 * half] *= correction;
        o[mi][di][2 * half + 1] *= correction;
      }
    }
  }
}
// Walks the chunks of up to kChunk rows of a work item's other-side tiles
// [first, last), in order. With causal masking it skips what no row of the
// item may see: for query items (keys side) the keys after the last query;
// for key items (queries side) the queries before the first key.
template <int kChunk, bool kKeysSide>
struct ChunkCursor {
  const CudaTileRows* tiles;
  int last;   // end of the item's tiles
  int limit;  // keys: last query position; queries: first key position
  bool causal;
  int index;  // current tile
  CudaTileRows tile;
  int start;  // first row of the chunk in the tile

  __device__ __forceinline__ void Begin(const CudaTileRows* all, int first,
                                        int end, int position_limit,
                                        bool is_causal) {
    tiles = all;
    last = end;
    limit = position_limit;
    causal = is_causal;
    index = first;
    Enter();
  }
  __device__ __forceinline__ bool Valid() const { return index < last; }
  __device__ __forceinline__ int Rows() const {
    return min(kChunk, tile.count - start);
  }
  __device__ __forceinline__ int FirstRow() const {
    return tile.row + start * tile.row_step;
  }
  __device__ __forceinline__ int FirstPosition() const {
    return tile.position + start * tile.position_step;
  }
  __device__ __forceinline__ int LastPosition() const {
    return tile.position + (start + Rows() - 1) * tile.position_step;
  }
  __device__ __forceinline__ void Next() {
    start += kChunk;
    const bool done = start >= tile.count ||
                      (kKeysSide && causal &&
                       tile.position + start * tile.position_step > limit);
    if (done) {
      ++index;
      Enter();
    }
  }

 private:
  // Loads tile `index` (if any) and its first chunk start.
  __device__ __forceinline__ void Enter() {
    start = 0;
    if (index >= last) return;
    tile = tiles[index];
    if (!kKeysSide && causal && limit > tile.position) {
      start =
          (limit - tile.position + tile.position_step - 1) / tile.position_step;
    }
  }
};

// The forward's epilogue for the tensor-core kernels: each lane holds the
// running (o, m, l) of its rows in C-fragment layout ([16 kMTiles, D] per
// warp, rows row0 + FragmentRow(...) of the item's query tile), m in base 2.
// Merges (o / l, m + log l) into the accumulators (OutT float; every lane of
// a quad reads the row's old lse before any lane writes it) or writes the
// rows (OutT bf16). Rows with no allowed key (l = 0) are left as they are.
template <int D, int kMTiles, typename OutT>
__device__ __forceinline__ void StoreForwardRows(
    const KernelArgs& a, int64_t b, const CudaWorkItem& item, int row0,
    const float (&o)[kMTiles][D / 8][4], const float (&m)[kMTiles][2],
    const float (&l)[kMTiles][2]) {
  constexpr bool kMerge = std::is_same<OutT, float>::value;
  const CudaTileRows qt = item.rows;
  const int lane = threadIdx.x & 31;
  OutT* out_head = static_cast<OutT*>(a.out_acc) + QueryOffset(a, b, item.head);
  float* lse_head =
      static_cast<float*>(a.lse_acc) + (b * a.heads + item.head) * a.q_rows;
  float total[kMTiles][2], old_lse[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = l[mi][half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      total[mi][half] = sum;
      const int r = row0 + FragmentRow(mi, 2 * half);
      old_lse[mi][half] = kMerge && r < qt.count
                              ? lse_head[qt.row + r * qt.row_step]
                              : -INFINITY;
    }
  }
  __syncwarp();
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = row0 + FragmentRow(mi, 2 * half);
      if (r >= qt.count || total[mi][half] == 0.f) continue;
      const int64_t row = qt.row + static_cast<int64_t>(r) * qt.row_step;
      const float inv = 1.f / total[mi][half];
      // A +inf score makes total NaN (its p is NaN, so is o): lse is +inf,
      // as on the CPU and in the float64 oracle.
      const float row_max = m[mi][half];
      const Merge<float> merge = MergeOf(
          old_lse[mi][half], row_max == INFINITY
                                 ? INFINITY
                                 : (row_max + log2f(total[mi][half])) * kLn2);
      OutT* out_row = out_head + row * a.q_row_stride;
#pragma unroll
      for (int di = 0; di < D / 8; ++di) {
        OutT* at = out_row + FragmentCol(di, 0);
        const float x = o[mi][di][2 * half] * inv;
        const float y = o[mi][di][2 * half + 1] * inv;
        if constexpr (kMerge) {
          float2* p = reinterpret_cast<float2*>(at);
          float2 cur = *p;
          cur.x = merge.Apply(cur.x, x);
          cur.y = merge.Apply(cur.y, y);
          *p = cur;
        } else {
          AddOrStore2(at, x, y);
        }
      }
      if ((lane & 3) == 0) lse_head[row] = merge.lse;
    }
  }
}

// ---------------------------------------------------------------------------
// Launching (host).

// Raises a kernel's dynamic shared memory limit on the current device.
template <typename Kernel>
void AllowSharedMemory(Kernel kernel, size_t bytes) {
  LC_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)));
}

// One launch per pattern index of `work`, grid (items, batch).
template <typename Kernel>
void LaunchPerPattern(Kernel kernel, const char* name,
                      const CudaAttentionArgs& args, const CudaWorkList& work,
                      KernelArgs ka, int threads, size_t smem) {
  cudaStream_t stream = CurrentCudaStream(args.device);
  for (size_t i = 0; i + 1 < work.pattern_begin.size(); ++i) {
    const int64_t begin = work.pattern_begin[i];
    const int64_t count = work.pattern_begin[i + 1] - begin;
    if (count == 0) continue;
    ka.items = work.items + begin;
    const dim3 grid(static_cast<unsigned>(count),
                    static_cast<unsigned>(args.batch));
    kernel<<<grid, threads, smem, stream>>>(ka);
    LC_CUDA_CHECK_LAUNCH(name);
  }
}

}  // namespace attention_cuda
}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_CUDA_KERNEL_CUH_
