// Differentiable activation functions (ReLU, SiLU, GELU) on float32, float64
// or bfloat16 (computed in float32) tensors of any shape and strides, on the
// CPU or a CUDA device.
#ifndef LONGCTX_OPS_ACTIVATION_H_
#define LONGCTX_OPS_ACTIVATION_H_

#include "core/tensor.h"

namespace lc {

// max(x, 0) element-wise (NaN stays NaN); same shape as x. The gradient at 0
// is 0.
Tensor Relu(const Tensor& x);

// x * sigmoid(x) element-wise; same shape as x.
Tensor Silu(const Tensor& x);

enum class GeluApproximation {
  kNone,  // exact: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
  kTanh,  // 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
};

// The Gaussian error linear unit element-wise; same shape as x.
Tensor Gelu(const Tensor& x,
            GeluApproximation approximation = GeluApproximation::kNone);

}  // namespace lc

#endif  // LONGCTX_OPS_ACTIVATION_H_
