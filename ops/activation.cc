#include "ops/activation.h"

#include "ops/elementwise_functors.h"
#include "ops/elementwise_kernel.h"

namespace lc {

Tensor Relu(const Tensor& x) {
  return UnaryOp("Relu", x, SavedForBackward::kOutput, ReluFn(),
                 ElementwiseBackward("Relu", ReluGradFn()));
}

Tensor Silu(const Tensor& x) {
  return UnaryOp("Silu", x, SavedForBackward::kInput, SiluFn(),
                 ElementwiseBackward("Silu", SiluGradFn()));
}

Tensor Gelu(const Tensor& x, GeluApproximation approximation) {
  if (approximation == GeluApproximation::kTanh) {
    return UnaryOp("Gelu", x, SavedForBackward::kInput, GeluTanhFn(),
                   ElementwiseBackward("Gelu", GeluTanhGradFn()));
  }
  return UnaryOp("Gelu", x, SavedForBackward::kInput, GeluErfFn(),
                 ElementwiseBackward("Gelu", GeluErfGradFn()));
}

}  // namespace lc
