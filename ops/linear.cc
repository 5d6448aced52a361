#include "ops/linear.h"

#include <cmath>
#include <vector>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"

namespace lc {
namespace {

// A [shape] tensor of independent U(-bound, bound) draws.
Tensor Uniform(const Shape& shape, double bound, Generator& gen, DType dtype) {
  std::vector<double> values = Rand(shape, gen, DType::kFloat64).ToVector();
  for (double& v : values) v = (2 * v - 1) * bound;
  return FromVector(values, shape, dtype);
}

}  // namespace

Tensor Linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  Tensors inputs = {x, weight};
  if (bias.defined()) inputs.push_back(bias);
  CheckFloatingInputs("Linear", inputs);
  LC_REQUIRE(weight.dim() == 2, "Linear: weight has shape ",
             ShapeToString(weight.shape()), " (expected 2-D [out, in])");
  LC_REQUIRE(x.dim() >= 1 && x.size(-1) == weight.size(1),
             "Linear: x has shape ", ShapeToString(x.shape()),
             " but weight has shape ", ShapeToString(weight.shape()),
             " (expected x [..., ", weight.size(1), "])");
  LC_REQUIRE(!bias.defined() || bias.shape() == Shape{weight.size(0)},
             "Linear: bias has shape ",
             bias.defined() ? ShapeToString(bias.shape()) : "",
             " but weight has shape ", ShapeToString(weight.shape()),
             " (expected [", weight.size(0), "])");
  if (ComputesOnFloat32Copies(x)) {
    // The product and the bias add both in float32, rounded to bfloat16 once
    // (on CUDA the GEMM accumulates in float32 and the product is rounded to
    // bfloat16 before the bias add).
    return ComputeInFloat32(
        [&](const Tensor& x32, const Tensor& weight32) {
          return Linear(x32, weight32,
                        bias.defined() ? bias.to(DType::kFloat32) : bias);
        },
        x, weight);
  }
  if (x.dim() == 1) return Linear(x.unsqueeze(0), weight, bias).squeeze(0);
  const Tensor y = Matmul(x, weight, /*transpose_a=*/false,
                          /*transpose_b=*/true);
  return bias.defined() ? Add(y, bias) : y;
}

namespace nn {

Linear::Linear(int64_t in, int64_t out, bool bias, Generator& gen,
               DType dtype) {
  LC_REQUIRE(in > 0 && out > 0, "nn::Linear: in = ", in, ", out = ", out,
             " (expected both > 0)");
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight_ = RegisterParameter("weight", Uniform({out, in}, bound, gen, dtype));
  if (bias)
    bias_ = RegisterParameter("bias", Uniform({out}, bound, gen, dtype));
}

Tensor Linear::Forward(const Tensor& x) const {
  return ::lc::Linear(x, weight_, bias_);
}

}  // namespace nn
}  // namespace lc
