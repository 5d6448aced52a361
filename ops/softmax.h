// Differentiable softmax and log-softmax along one dim, numerically stable
// (the line's maximum is subtracted before exp), with dedicated backward
// kernels. Inputs may be float32, float64 or bfloat16 (computed in float32),
// of any shape and strides, on the CPU or a CUDA device.
#ifndef LONGCTX_OPS_SOFTMAX_H_
#define LONGCTX_OPS_SOFTMAX_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {

// exp(x) / sum(exp(x)) along `dim` (in [-rank, rank)); same shape as x.
Tensor Softmax(const Tensor& x, int64_t dim);

// x - log(sum(exp(x))) along `dim`; same shape as x.
Tensor LogSoftmax(const Tensor& x, int64_t dim);

}  // namespace lc

#endif  // LONGCTX_OPS_SOFTMAX_H_
