// CUDA kernels of ops/norm.cc: the forward and backward of LayerNorm and
// RmsNorm over the last dim, one warp per row, statistics in float32
// (float64 for float64 tensors), weight and bias gradients reduced in a fixed
// order (no atomics: equal inputs give bit-identical gradients).
#ifndef LONGCTX_OPS_NORM_CUDA_H_
#define LONGCTX_OPS_NORM_CUDA_H_

#include "core/tensor.h"

namespace lc {
namespace internal {

// For dense x [rows, dim] (float32, float64 or bfloat16) on a CUDA device and
// weight, bias [dim] (dense, x's dtype, or undefined for 1 and 0):
//   mean[r] = mean_d x[r, d] when center, else 0,
//   rstd[r] = 1 / sqrt(mean_d (x[r, d] - mean[r])^2 + eps),
//   y[r, d] = (x[r, d] - mean[r]) * rstd[r] * weight[d] + bias[d].
// y is dense [rows, dim] of x's dtype; mean and rstd are dense [rows] of
// ComputeDType(x.dtype()). Runs on the device's current stream.
void NormForwardCuda(const Tensor& x, const Tensor& weight, const Tensor& bias,
                     double eps, bool center, const Tensor& y,
                     const Tensor& mean, const Tensor& rstd);

// The backward of NormForwardCuda for the output gradient g (dense [rows,
// dim]): with xhat = (x - mean) * rstd and gw = g * weight,
//   dx = rstd * (gw - mean_d gw [when center] - xhat * mean_d(gw * xhat)),
//   dweight = sum_r g * xhat,  dbias = sum_r g,
// dx dense [rows, dim] and dweight, dbias dense [dim] of x's dtype; dweight
// and dbias may be undefined (not computed).
void NormBackwardCuda(const Tensor& x, const Tensor& weight, const Tensor& mean,
                      const Tensor& rstd, const Tensor& g, bool center,
                      const Tensor& dx, const Tensor& dweight,
                      const Tensor& dbias);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_NORM_CUDA_H_
