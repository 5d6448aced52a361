// CUDA kernel of ops/rope.cc: the rotary position embedding of
// [batch, n, heads, head_dim] tensors of any strides, with cos and sin of the
// angles computed in float64 on the device.
#ifndef LONGCTX_OPS_ROPE_CUDA_H_
#define LONGCTX_OPS_ROPE_CUDA_H_

#include "core/tensor.h"

namespace lc {
namespace internal {

// The largest head_dim RotaryCuda takes (each block keeps the head_dim / 2
// inverse frequencies in shared memory, in float64).
constexpr int64_t kMaxRotaryHeadDimCuda = 4096;

// out = x rotated by sign * angle (see ApplyRotary in ops/rope.h) for x
// [batch, n, heads, head_dim] (floating, any strides, head_dim even and at
// most kMaxRotaryHeadDimCuda) and positions (int64 [n], any stride) on one
// CUDA device; out is dense of x's shape and dtype. sign = -1 is the inverse
// rotation (the backward). Angles, cos and sin in float64, the rotation in
// float32 (float64 for float64).
void RotaryCuda(const Tensor& x, const Tensor& positions, double base,
                double sign, const Tensor& out);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_ROPE_CUDA_H_
