// Hopper (sm_90a) building blocks of the attention kernels and the Wgmma
// tensor-core policy built from them (NOTE [ Tensor-core policies ]): the
// 128-byte swizzled shared-memory tile layout that wgmma reads, its matrix
// descriptors, warpgroup MMA (wgmma.mma_async, bfloat16 in, float32
// accumulators) with its fences, and the proxy fence between ordinary
// shared-memory writes and the tensor cores' reads. Internal to attention/;
// nvcc only, for sm_90a (the wgmma instructions exist only there).
#ifndef LONGCTX_ATTENTION_ATTENTION_SM90_CUH_
#define LONGCTX_ATTENTION_ATTENTION_SM90_CUH_

#include <cstdint>

#include "attention/attention_tensor_core.cuh"

namespace lc {
namespace attention_cuda {
namespace sm90 {

// NOTE [ 128-byte swizzled tiles ]
// A [kRows, D] bfloat16 tile (D a multiple of 64) is stored as D / 64 column
// blocks of [kRows, 64]: block j holds columns 64 j .. 64 j + 63 of every
// row, rows 128 bytes apart, and the 16-byte chunk c of row r sits at chunk
// position c ^ (r % 8) (the hardware's 128-byte swizzle, Swizzle<3,4,3>).
// Every block starts on a 1024-byte boundary, so the swizzle phase of an
// address is that of its row. wgmma reads such a tile in either role:
//   K-major (rows are M or N, columns are K): 8-row groups 1024 bytes apart
//     (the stride byte offset); a k step of 16 columns advances the start
//     address by 32 bytes inside a block, the next block by kRows * 128.
//   MN-major (rows are K, columns are N): 8-row groups of K 1024 bytes apart
//     (the stride byte offset), column blocks of N kRows * 128 bytes apart
//     (the leading byte offset); a k step of 16 rows advances by 2048 bytes.
constexpr int kSwizzleBytes = 128;
constexpr int kSwizzleAtomBytes = 8 * kSwizzleBytes;  // 8 rows

// Byte offset of 16-byte chunk `chunk` (0 .. D / 8) of row `row` in a
// [kRows, D] tile.
template <int kRows>
__device__ __forceinline__ uint32_t SwizzledChunk(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * kRows * kSwizzleBytes +
                               row * kSwizzleBytes +
                               (((chunk & 7) ^ (row & 7)) << 4));
}

// The wgmma matrix descriptor of a 128-byte swizzled operand at shared
// address `address`: bits 0-13 address / 16, 16-29 leading byte offset / 16,
// 32-45 stride byte offset / 16, 62-63 the swizzle mode (1: 128 bytes).
__device__ __forceinline__ uint64_t Descriptor(uint32_t address,
                                               uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32 |
         uint64_t{1} << 62;
}

// Descriptor of the 64 x 16 (or N x 16) K-major operand at rows from
// `first_row` of a [kRows, D] tile at `tile`, k step `ks` (columns 16 ks ..).
template <int kRows>
__device__ __forceinline__ uint64_t KMajorDescriptor(uint32_t tile,
                                                     int first_row, int ks) {
  const uint32_t address = tile + (ks >> 2) * kRows * kSwizzleBytes +
                           first_row * kSwizzleBytes + (ks & 3) * 32;
  return Descriptor(address, 16, kSwizzleAtomBytes);
}

// Descriptor of the 16 x D MN-major operand at rows 16 kk .. 16 kk + 15 of
// a [kRows, D] tile at `tile`.
template <int kRows>
__device__ __forceinline__ uint64_t MnMajorDescriptor(uint32_t tile, int kk) {
  return Descriptor(tile + kk * 2 * kSwizzleAtomBytes, kRows * kSwizzleBytes,
                    kSwizzleAtomBytes);
}

// Orders this thread's earlier ordinary shared-memory writes (st.shared,
// cp.async) before later reads by the tensor cores or the copy engine (the
// async proxy). Each writing thread issues it before the barrier.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// wgmma ordering: Fence before the first wgmma of a batch (and whenever its
// accumulator or A registers were written by other instructions), Commit
// after the batch, Wait<k> until at most k batches are in flight.
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kInFlight>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kInFlight)
               : "memory");
}

// Pins accumulator registers at this point: the compiler may not move their
// reads or writes across it (wgmma writes them asynchronously, so reads must
// stay after WgmmaWait and writes before WgmmaFence).
template <int kRows>
__device__ __forceinline__ void FenceRegisters(float (&d)[kRows][4]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
  }
}

// Warpgroup MMA m64nNk16, bfloat16 operands, float32 accumulators d[N / 8][4]
// in the C-fragment layout of mma.sync repeated over N: warp w of the
// warpgroup holds rows 16 w + lane / 4 (+ 8), columns 8 j + 2 (lane % 4)
// (+ 1) in d[j]. Issued by all 128 threads of a warpgroup.
template <int N>
struct WarpgroupMma;

template <>
struct WarpgroupMma<64> {
  // d (64 x 64) (+)= A (64 x 16, shared memory, K-major) * B (16 x 64,
  // shared memory, K-major); scale_d = 0 overwrites d.
  static __device__ __forceinline__ void SS(float (&d)[8][4], uint64_t a,
                                            uint64_t b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, "
        "%15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, "
        "%29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(a), "l"(b), "r"(scale_d));
  }
  // d (64 x 64) += A (64 x 16 from registers, the m16n8k16 A fragments of
  // each warp's 16 rows) * B (16 x 64, shared memory, MN-major).
  static __device__ __forceinline__ void RS(float (&d)[8][4],
                                            const uint32_t (&a)[4],
                                            uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, "
        "%15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, "
        "%29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));
  }
};

template <>
struct WarpgroupMma<128> {
  // d (64 x 128) (+)= A (64 x 16, shared memory, K-major) * B (16 x 128,
  // shared memory, K-major); scale_d = 0 overwrites d.
  static __device__ __forceinline__ void SS(float (&d)[16][4], uint64_t a,
                                            uint64_t b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, "
        "%15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, "
        "%29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
        "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, "
        "%57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(a), "l"(b), "r"(scale_d));
  }
  // d (64 x 128) += A (64 x 16 from registers, the m16n8k16 A fragments of
  // each warp's 16 rows) * B (16 x 128, shared memory, MN-major).
  static __device__ __forceinline__ void RS(float (&d)[16][4],
                                            const uint32_t (&a)[4],
                                            uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, "
        "%15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, "
        "%29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
        "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, "
        "%57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));
  }
};

}  // namespace sm90

// The tensor-core policy of Hopper: tiles in the 128-byte swizzled layout,
// products on warpgroup MMA. Each product is issued by the whole warpgroup
// (its four warps' 64 rows) and waited for before returning, so the kernels
// see the same synchronous contract as MmaSync's. Preconditions: kMTiles ==
// 1 and the block's warps form whole warpgroups (warp w owns rows 16 w ..
// 16 w + 15, its warpgroup rows 64 (w / 4) ..).
struct Wgmma {
  static constexpr int kTileAlignment = sm90::kSwizzleAtomBytes;

  template <int kRows, int D>
  static __device__ __forceinline__ int TileOffset(int row, int chunk) {
    static_assert(kRows % 8 == 0 && D % 64 == 0, "whole swizzle atoms");
    return static_cast<int>(sm90::SwizzledChunk<kRows>(row, chunk) /
                            sizeof(bf16));
  }

  // Hazard: cp.async wrote the tiles through the generic proxy; wgmma reads
  // them through the async proxy.
  static __device__ __forceinline__ void AfterTileWrites() {
    sm90::FenceProxyAsync();
  }

  template <int D, int kMTiles, int kNTiles, int kARows>
  static __device__ __forceinline__ void GemmABt(
      float (&acc)[kMTiles][kNTiles][4], const bf16* a_tile, int a_row0,
      const bf16* b_tile) {
    static_assert(kMTiles == 1, "one warpgroup MMA covers 16 rows per warp");
    constexpr int kBRows = kNTiles * 8;
    const uint32_t a = SmemAddress(a_tile), b = SmemAddress(b_tile);
    const int warpgroup_row0 = a_row0 & ~63;
    sm90::FenceRegisters(acc[0]);
    sm90::WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      sm90::WarpgroupMma<kBRows>::SS(
          acc[0], sm90::KMajorDescriptor<kARows>(a, warpgroup_row0, ks),
          sm90::KMajorDescriptor<kBRows>(b, 0, ks), 1);
    }
    sm90::WgmmaCommit();
    sm90::WgmmaWait<0>();
    sm90::FenceRegisters(acc[0]);
  }

  template <int D, int kMTiles, int kKSteps>
  static __device__ __forceinline__ void GemmAB(
      float (&acc)[kMTiles][D / 8][4], const uint32_t (&p)[kMTiles][kKSteps][4],
      const bf16* b_tile) {
    static_assert(kMTiles == 1, "one warpgroup MMA covers 16 rows per warp");
    const uint32_t b = SmemAddress(b_tile);
    sm90::FenceRegisters(acc[0]);
    sm90::WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      sm90::WarpgroupMma<D>::RS(acc[0], p[0][kk],
                                sm90::MnMajorDescriptor<kKSteps * 16>(b, kk));
    }
    sm90::WgmmaCommit();
    sm90::WgmmaWait<0>();
    sm90::FenceRegisters(acc[0]);
  }
};

// Tile shapes on Hopper: the forward walks keys in chunks of 128 (the N of
// S = Q K^T); dQ walks keys and dK/dV queries in chunks of 64. Eight warps
// (two warpgroups) per block, one block of 128 rows.
template <>
struct TensorCoreShapes<Wgmma, 64> {
  static constexpr int kForwardWarps = 8, kForwardMTiles = 1;
  static constexpr int kKeyChunk = 128;
  static constexpr int kGradWarps = 8, kGradKeyChunk = 64, kGradQueryChunk = 64;
};
template <>
struct TensorCoreShapes<Wgmma, 128> {
  static constexpr int kForwardWarps = 8, kForwardMTiles = 1;
  static constexpr int kKeyChunk = 128;
  static constexpr int kGradWarps = 8, kGradKeyChunk = 64, kGradQueryChunk = 64;
};

}  // namespace attention_cuda
}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_SM90_CUH_
