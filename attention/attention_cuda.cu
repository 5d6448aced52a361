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
// whole-tile passes taken only by the chunks that need them.
// FMA kernels (float32, float64, other head dims): one warp per row, lanes
// across head_dim, the same work lists and the same pair rule.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention/attention_cuda.h"
#include "core/check.h"
#include "core/cuda.h"
#include "core/philox.h"

namespace lc {
namespace {

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

// Element offset of (row, 16-byte chunk) in a [rows, D] bfloat16 tile in
// shared memory whose chunks are swizzled by chunk ^ (row % 8): the 8 rows
// an ldmatrix phase reads at one logical chunk fall in 8 distinct banks.
template <int D>
__device__ __forceinline__ int Swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
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
// at most kRows) of one head into a swizzled [kRows, D] tile; the rows past
// valid_rows are zero-filled. Row i of the head starts at head + i * pitch.
template <int kRows, int D, int kThreads>
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
    CpAsync16(SmemAddress(tile + Swizzle<D>(r, c)), src, valid);
  }
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4],
                                                uint32_t addr) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, "
      "[%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(addr));
}

// c += a (16x16 bfloat16, row major) * b (16x8 bfloat16, column major).
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4],
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
template <int D, int kMTiles, int kNTiles>
__device__ __forceinline__ void GemmABt(float (&acc)[kMTiles][kNTiles][4],
                                        const bf16* a_tile, int a_row0,
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
      LdMatrixX4(
          b, SmemAddress(b_tile + Swizzle<D>(row, 2 * ks + ((lane >> 3) & 1))));
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        Mma(acc[mi][2 * nj], a[mi], b[0], b[1]);
        Mma(acc[mi][2 * nj + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// acc[mi][di] += P * B[0 .. 16 kKSteps, :] for P a [16 kMTiles, 16 kKSteps]
// bfloat16 matrix held as A fragments (p[mi][kk]) and B a swizzled [rows, D]
// bfloat16 tile in shared memory (read transposed by ldmatrix).
template <int D, int kMTiles, int kKSteps>
__device__ __forceinline__ void GemmAB(float (&acc)[kMTiles][D / 8][4],
                                       const uint32_t (&p)[kMTiles][kKSteps][4],
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
        Mma(acc[mi][2 * dj], p[mi][kk], b[0], b[1]);
        Mma(acc[mi][2 * dj + 1], p[mi][kk], b[2], b[3]);
      }
    }
  }
}

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

// ---------------------------------------------------------------------------
// Tensor-core forward: one block per (query item, batch index). Each of
// kWarps warps owns 16 kMTiles query rows; the block walks the item's keys in
// chunks of kBlockN, double-buffered. Chunks that need no mask (whole, not
// on the causal diagonal, no padding) take no per-element branch.
// q: [batch, q_rows, heads, D] bf16; k, v: [batch, k_rows, heads, D] bf16;
// out_acc: [batch, q_rows, heads, D] of OutT and lse_acc: [batch, heads,
// q_rows] float32: merged into (OutT float) or written (OutT bf16).
template <int D, int kWarps, int kMTiles, int kBlockN, typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
    ForwardMmaKernel(const KernelArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = kWarps * kMTiles * 16;
  constexpr int kNTiles = kBlockN / 8;
  static_assert(kBlockM == kCudaQueryTileRows, "query items are the block");
  extern __shared__ __align__(128) unsigned char smem[];
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

  LoadTileAsync<kBlockM, D, kThreads>(q_tile, q_head, q_pitch, qt.row,
                                      qt.row_step, qt.count);
  CpAsyncCommit();
  ChunkCursor<kBlockN, true> chunk;
  chunk.Begin(a.tiles, item.first, item.last, PositionOf(qt, qt.count - 1),
              a.causal);
  LoadTileAsync<kBlockN, D, kThreads>(k_tiles, k_head, k_pitch,
                                      chunk.FirstRow(), chunk.tile.row_step,
                                      chunk.Rows());
  LoadTileAsync<kBlockN, D, kThreads>(v_tiles, v_head, k_pitch,
                                      chunk.FirstRow(), chunk.tile.row_step,
                                      chunk.Rows());
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
      LoadTileAsync<kBlockN, D, kThreads>(k_tiles + (buf ^ 1) * kBlockN * D,
                                          k_head, k_pitch, chunk.FirstRow(),
                                          chunk.tile.row_step, chunk.Rows());
      LoadTileAsync<kBlockN, D, kThreads>(v_tiles + (buf ^ 1) * kBlockN * D,
                                          v_head, k_pitch, chunk.FirstRow(),
                                          chunk.tile.row_step, chunk.Rows());
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();

    float s[kMTiles][kNTiles][4];
    Zero(s);
    GemmABt<D, kMTiles, kNTiles>(s, q_tile, row0, k_tile);
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
    GemmAB<D, kMTiles, kNTiles / 2>(o, p, v_tile);
    __syncthreads();
    if (!more) break;
  }

  // Merge (o / l, m + log l) into the accumulators (every lane of a quad
  // reads the row's old lse before any lane writes it), or write it.
  constexpr bool kMerge = std::is_same<OutT, float>::value;
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
      OutT* out_row = out_head + row * q_pitch;
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
template <int D, int kWarps, int kBlockN, typename GradT>
__global__ void __launch_bounds__(kWarps * 32)
    GradQueryMmaKernel(const KernelArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = kWarps * 16;
  constexpr int kNTiles = kBlockN / 8;
  static_assert(kBlockM == kCudaQueryTileRows, "query items are the block");
  extern __shared__ __align__(128) unsigned char smem[];
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

  LoadTileAsync<kBlockM, D, kThreads>(q_tile,
                                      static_cast<const bf16*>(a.q) + q_offset,
                                      q_pitch, qt.row, qt.row_step, qt.count);
  LoadTileAsync<kBlockM, D, kThreads>(
      g_tile, static_cast<const bf16*>(a.grad_out) + q_offset, q_pitch, qt.row,
      qt.row_step, qt.count);
  CpAsyncCommit();
  ChunkCursor<kBlockN, true> chunk;
  chunk.Begin(a.tiles, item.first, item.last, PositionOf(qt, qt.count - 1),
              a.causal);
  LoadTileAsync<kBlockN, D, kThreads>(k_tiles, k_head, k_pitch,
                                      chunk.FirstRow(), chunk.tile.row_step,
                                      chunk.Rows());
  LoadTileAsync<kBlockN, D, kThreads>(v_tiles, v_head, k_pitch,
                                      chunk.FirstRow(), chunk.tile.row_step,
                                      chunk.Rows());
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
      LoadTileAsync<kBlockN, D, kThreads>(k_tiles + (buf ^ 1) * kBlockN * D,
                                          k_head, k_pitch, chunk.FirstRow(),
                                          chunk.tile.row_step, chunk.Rows());
      LoadTileAsync<kBlockN, D, kThreads>(v_tiles + (buf ^ 1) * kBlockN * D,
                                          v_head, k_pitch, chunk.FirstRow(),
                                          chunk.tile.row_step, chunk.Rows());
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();

    float s[1][kNTiles][4], dp[1][kNTiles][4];
    Zero(s);
    Zero(dp);
    GemmABt<D, 1, kNTiles>(s, q_tile, row0, k_tile);
    GemmABt<D, 1, kNTiles>(dp, g_tile, row0, v_tile);
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
    GemmAB<D, 1, kNTiles / 2>(dq, ds, k_tile);
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
template <int D, int kWarps, int kQChunk, typename GradT>
__global__ void __launch_bounds__(kWarps * 32)
    GradKeyValueMmaKernel(const KernelArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockN = kWarps * 16;
  constexpr int kNTiles = kQChunk / 8;
  static_assert(kBlockN == kCudaKeyTileRows, "key items are the block");
  extern __shared__ __align__(128) unsigned char smem[];
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

  LoadTileAsync<kBlockN, D, kThreads>(k_tile,
                                      static_cast<const bf16*>(a.k) + k_offset,
                                      k_pitch, kt.row, kt.row_step, kt.count);
  LoadTileAsync<kBlockN, D, kThreads>(v_tile,
                                      static_cast<const bf16*>(a.v) + k_offset,
                                      k_pitch, kt.row, kt.row_step, kt.count);
  CpAsyncCommit();
  ChunkCursor<kQChunk, false> chunk;
  chunk.Begin(a.tiles, item.first, item.last, kt.position, a.causal);
  // Loads the cursor's query chunk into buffer `buf`: q and do rows by
  // cp.async, their row statistics by plain stores.
  auto load_chunk = [&](int buf) {
    LoadTileAsync<kQChunk, D, kThreads>(q_tiles + buf * kQChunk * D, q_head,
                                        q_pitch, chunk.FirstRow(),
                                        chunk.tile.row_step, chunk.Rows());
    LoadTileAsync<kQChunk, D, kThreads>(g_tiles + buf * kQChunk * D, g_head,
                                        q_pitch, chunk.FirstRow(),
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
    __syncthreads();

    float st[1][kNTiles][4], dpt[1][kNTiles][4];
    Zero(st);
    Zero(dpt);
    GemmABt<D, 1, kNTiles>(st, k_tile, row0, q_tile);
    GemmABt<D, 1, kNTiles>(dpt, v_tile, row0, g_tile);
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
    GemmAB<D, 1, kNTiles / 2>(dv, frags, g_tile);
    ToAFragments(dpt, frags);
    GemmAB<D, 1, kNTiles / 2>(dk, frags, q_tile);
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

// Tile shapes of the tensor-core kernels per head_dim, chosen so that the
// accumulators fit the 255 registers a thread has (ptxas -v: at most 44
// bytes of spills per thread): the forward keeps 32 rows per warp at head_dim
// 64 (4 warps, 2 blocks per SM) and 16 at 128 (8 warps, where 32 rows spill);
// the forward walks keys in chunks of 64, dQ in chunks of 32 (head_dim 64)
// or 64 (128); dK/dV walk queries in chunks of 64 (head_dim 64) or 32 (128)
// rows. Every kernel holds 8 warps per SM. A sweep of eight shapes on the
// H200 (BENCHMARKS.md) found these the fastest at head_dim 64.
template <int D>
struct MmaConfig;
template <>
struct MmaConfig<64> {
  static constexpr int kForwardWarps = 4, kForwardMTiles = 2;
  static constexpr int kKeyChunk = 64;
  static constexpr int kGradWarps = 8, kGradKeyChunk = 32, kGradQueryChunk = 64;
};
template <>
struct MmaConfig<128> {
  static constexpr int kForwardWarps = 8, kForwardMTiles = 1;
  static constexpr int kKeyChunk = 64;
  static constexpr int kGradWarps = 8, kGradKeyChunk = 64, kGradQueryChunk = 32;
};

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

template <int D, typename OutT>
void ForwardMma(const CudaAttentionArgs& args, const CudaWorkList& work,
                const KernelArgs& ka) {
  using C = MmaConfig<D>;
  constexpr int kBlockM = C::kForwardWarps * C::kForwardMTiles * 16;
  const size_t smem = (kBlockM + 4 * C::kKeyChunk) * D * sizeof(bf16);
  auto kernel = ForwardMmaKernel<D, C::kForwardWarps, C::kForwardMTiles,
                                 C::kKeyChunk, OutT>;
  AllowSharedMemory(kernel, smem);
  LaunchPerPattern(kernel, "ForwardMmaKernel", args, work, ka,
                   C::kForwardWarps * 32, smem);
}

template <int D, typename GradT>
void BackwardMma(const CudaAttentionArgs& args, const CudaWorkList& queries,
                 const CudaWorkList& keys, const KernelArgs& query_args,
                 const KernelArgs& key_args) {
  using C = MmaConfig<D>;
  constexpr int kBlock = C::kGradWarps * 16;
  const size_t q_smem = (2 * kBlock + 4 * C::kGradKeyChunk) * D * sizeof(bf16);
  auto q_kernel = GradQueryMmaKernel<D, C::kGradWarps, C::kGradKeyChunk, GradT>;
  AllowSharedMemory(q_kernel, q_smem);
  LaunchPerPattern(q_kernel, "GradQueryMmaKernel", args, queries, query_args,
                   C::kGradWarps * 32, q_smem);
  const size_t kv_smem =
      (2 * kBlock + 4 * C::kGradQueryChunk) * D * sizeof(bf16) +
      4 * C::kGradQueryChunk * sizeof(float);
  auto kv_kernel =
      GradKeyValueMmaKernel<D, C::kGradWarps, C::kGradQueryChunk, GradT>;
  AllowSharedMemory(kv_kernel, kv_smem);
  LaunchPerPattern(kv_kernel, "GradKeyValueMmaKernel", args, keys, key_args,
                   C::kGradWarps * 32, kv_smem);
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
    ForwardMma<decltype(d)::value, decltype(out)>(args, query_items, ka);
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
                    BackwardMma<decltype(d)::value, decltype(grad)>(
                        args, query_items, key_items, query_args, key_args);
                  });
  if (mma) return;
  LaunchSimt(args, query_items, query_args, 1);
  LaunchSimt(args, key_items, key_args, 2);
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
