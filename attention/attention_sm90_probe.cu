// The one-tile probe of attention_sm90_probe.h: both policies' products on
// one [128, d] x [64, d] tile, written out in C-fragment order.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "attention/attention_cuda_kernel.cuh"
#include "attention/attention_sm90.cuh"
#include "attention/attention_sm90_probe.h"
#include "core/check.h"
#include "core/cuda.h"
#include "core/status.h"

namespace lc {
namespace attention_cuda {
namespace {

constexpr int kThreads = 256;  // two warpgroups, 16 rows per warp
constexpr int kRows = 128;     // rows of a, p, c, o
constexpr int kCols = 64;      // rows of b and v: the N of c, the K of o

template <int D>
constexpr size_t ProbeSharedBytes() {
  return static_cast<size_t>(kRows + 2 * kCols) * D * sizeof(bf16) +
         sm90::kSwizzleAtomBytes;  // alignment slack for either policy
}

// a: (kRows, D), b and v: (kCols, D) bf16; p: (kRows, kCols) float;
// c: (kRows, kCols) and o: (kRows, D) float, all row-major.
template <typename Mma, int D>
__global__ void __launch_bounds__(kThreads)
    TileProbeKernel(const bf16* a, const bf16* b, const float* p, const bf16* v,
                    float* c, float* o) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* a_tile = reinterpret_cast<bf16*>(AlignTiles<Mma>(smem_raw));
  bf16* b_tile = a_tile + kRows * D;  // (kCols, D)
  bf16* v_tile = b_tile + kCols * D;  // (kCols, D)
  LoadTileAsync<Mma, kRows, D, kThreads>(a_tile, a, D, 0, 1, kRows);
  LoadTileAsync<Mma, kCols, D, kThreads>(b_tile, b, D, 0, 1, kCols);
  LoadTileAsync<Mma, kCols, D, kThreads>(v_tile, v, D, 0, 1, kCols);
  CpAsyncCommit();
  CpAsyncWait<0>();
  Mma::AfterTileWrites();
  __syncthreads();

  const int row0 = (threadIdx.x / 32) * 16;
  float s[1][kCols / 8][4];  // this warp's 16 rows of c
  Zero(s);
  Mma::template GemmABt<D, 1, kCols / 8, kRows>(s, a_tile, row0, b_tile);
  ForEachElement(
      s, row0, [&](int r, int col, int, float& x) { c[r * kCols + col] = x; });

  float pf[1][kCols / 8][4];  // this warp's 16 rows of p
  ForEachElement(
      pf, row0, [&](int r, int col, int, float& x) { x = p[r * kCols + col]; });
  uint32_t pa[1][kCols / 16][4];
  ToAFragments(pf, pa);
  float acc[1][D / 8][4];
  Zero(acc);
  Mma::template GemmAB<D, 1, kCols / 16>(acc, pa, v_tile);
  ForEachElement(acc, row0,
                 [&](int r, int col, int, float& x) { o[r * D + col] = x; });
#else
  __trap();  // built for sm_90a only
#endif
}

template <typename Mma, int D>
void Launch(const void* a, const void* b, const void* p, const void* v, void* c,
            void* o) {
  int device = 0;
  LC_CUDA_CHECK(cudaGetDevice(&device));
  auto kernel = TileProbeKernel<Mma, D>;
  AllowSharedMemory(kernel, ProbeSharedBytes<D>());
  kernel<<<1, kThreads, ProbeSharedBytes<D>(), CurrentCudaStream(device)>>>(
      static_cast<const bf16*>(a), static_cast<const bf16*>(b),
      static_cast<const float*>(p), static_cast<const bf16*>(v),
      static_cast<float*>(c), static_cast<float*>(o));
  LC_CUDA_CHECK_LAUNCH("TileProbeKernel");
}

}  // namespace
}  // namespace attention_cuda

void RunTensorCoreTileProbe(TensorCorePolicy policy, int d, const void* a,
                            const void* b, const void* p, const void* v,
                            void* c, void* o) {
  using attention_cuda::MmaSync;
  using attention_cuda::Wgmma;
  LC_REQUIRE(d == 64 || d == 128, "RunTensorCoreTileProbe: d ", d,
             " (expected 64 or 128)");
  const bool wgmma = policy == TensorCorePolicy::kWgmma;
  if (d == 64) {
    wgmma ? attention_cuda::Launch<Wgmma, 64>(a, b, p, v, c, o)
          : attention_cuda::Launch<MmaSync, 64>(a, b, p, v, c, o);
  } else {
    wgmma ? attention_cuda::Launch<Wgmma, 128>(a, b, p, v, c, o)
          : attention_cuda::Launch<MmaSync, 128>(a, b, p, v, c, o);
  }
  LC_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace lc
