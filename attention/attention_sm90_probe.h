// A one-tile check of the tensor-core policies (NOTE [ Tensor-core policies ]
// in attention_cuda_kernel.cuh), for tests only: the two products every
// tensor-core attention kernel is built from, run once on one tile by 256
// threads (two warpgroups), so that a layout or descriptor error shows up on
// its own before the whole kernels run. Built for sm_90a: needs a compute
// capability 9.0 device.
#ifndef LONGCTX_ATTENTION_ATTENTION_SM90_PROBE_H_
#define LONGCTX_ATTENTION_ATTENTION_SM90_PROBE_H_

namespace lc {

enum class TensorCorePolicy { kMmaSync, kWgmma };

// On the current CUDA device and stream, then synchronized, with d = 64 or
// 128 and every buffer contiguous device memory:
//   c [128, 64] float32 = a [128, d] bf16 * b [64, d] bf16 ^T   (GemmABt)
//   o [128, d] float32 = bf16(p) [128, 64] * v [64, d] bf16     (GemmAB)
// p is float32 [128, 64], rounded to bfloat16 in registers as the kernels
// round probabilities. Throws lc::Error for another d or a failed launch.
void RunTensorCoreTileProbe(TensorCorePolicy policy, int d, const void* a,
                            const void* b, const void* p, const void* v,
                            void* c, void* o);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_SM90_PROBE_H_
