// Normalization over the last dim: LayerNorm and RMSNorm, as functions with
// fused forward and backward kernels (CPU, and CUDA with float32 statistics
// and weight gradients summed in a fixed order) and as modules with learnable
// scales.
#ifndef LONGCTX_OPS_NORM_H_
#define LONGCTX_OPS_NORM_H_

#include <cstdint>

#include "core/module.h"
#include "core/tensor.h"

namespace lc {

// x [..., D] normalized over its last dim:
//   (x - mean) / sqrt(var + eps) * weight + bias   (var is the biased one).
// weight and bias are [D], or undefined Tensor() for 1 and 0. Returns
// [..., D].
Tensor LayerNorm(const Tensor& x, const Tensor& weight, const Tensor& bias,
                 double eps = 1e-5);

// x [..., D] divided by its root mean square over the last dim:
//   x * rsqrt(mean(x^2) + eps) * weight.
// weight is [D], or undefined Tensor() for 1. Returns [..., D].
Tensor RmsNorm(const Tensor& x, const Tensor& weight, double eps = 1e-6);

namespace nn {

// LayerNorm over the last dim of size `dim`, with parameters "weight" [dim]
// (initialized to 1) and, when `bias`, "bias" [dim] (initialized to 0).
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool bias = true,
                     DType dtype = DType::kFloat32);

  // x [..., dim] -> [..., dim].
  Tensor Forward(const Tensor& x) const;

  const Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }  // undefined without bias
  double eps() const { return eps_; }

 private:
  double eps_;
  Tensor weight_;
  Tensor bias_;
};

// RMSNorm over the last dim of size `dim`, with parameter "weight" [dim]
// (initialized to 1).
class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-6,
                   DType dtype = DType::kFloat32);

  // x [..., dim] -> [..., dim].
  Tensor Forward(const Tensor& x) const;

  const Tensor& weight() const { return weight_; }
  double eps() const { return eps_; }

 private:
  double eps_;
  Tensor weight_;
};

}  // namespace nn
}  // namespace lc

#endif  // LONGCTX_OPS_NORM_H_
