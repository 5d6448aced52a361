// CUDA kernels of ops/softmax.cc: softmax and log-softmax along any dim,
// forward and backward, for float32, float64 and bfloat16 tensors of any
// strides. Each line along the dim is reduced by one thread, one warp or one
// block (by the line's length and layout), accumulating in the compute type
// (float64, or float32 for float32 and bfloat16) in a fixed order.
#ifndef LONGCTX_OPS_SOFTMAX_CUDA_H_
#define LONGCTX_OPS_SOFTMAX_CUDA_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {
namespace internal {

// For every line of x along dim d (a scalar is one line of length 1):
//   softmax:     y = exp(x - max) / sum(exp(x - max))
//   log-softmax: y = (x - max) - log(sum(exp(x - max)))
// x: any strides; y: contiguous, x's shape and dtype, on x's device.
void SoftmaxForwardCuda(const Tensor& x, int64_t d, bool log, const Tensor& y);

// The gradient of SoftmaxForwardCuda from its output y and the output
// gradient g (one shape; any strides), for every line along dim d:
//   softmax:     gx = y * (g - sum(g * y))
//   log-softmax: gx = g - exp(y) * sum(g)
// gx: contiguous, y's shape and dtype, on y's device.
void SoftmaxBackwardCuda(const Tensor& g, const Tensor& y, int64_t d, bool log,
                         const Tensor& gx);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_SOFTMAX_CUDA_H_
