#include "ops/cpu_kernel.h"

namespace lc {

void CheckFloatingInputs(const char* op, absl::Span<const Tensor> inputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    LC_REQUIRE(t.defined(), op, ": input ", i, " is an undefined tensor");
    LC_REQUIRE(IsFloating(t.dtype()), op, ": input ", i, " has dtype ",
               DTypeName(t.dtype()),
               " (expected float32, float64 or bfloat16)");
    LC_REQUIRE(t.dtype() == inputs[0].dtype(), op, ": input ", i, " has dtype ",
               DTypeName(t.dtype()), " but input 0 has ",
               DTypeName(inputs[0].dtype()), " (expected one dtype)");
    LC_REQUIRE(t.device() == inputs[0].device(), op, ": input ", i, " is on ",
               t.device().ToString(), " but input 0 is on ",
               inputs[0].device().ToString(), " (expected one device)");
  }
}

Shape BroadcastStrides(const Tensor& t, const Shape& shape) {
  const size_t rank = shape.size();
  const size_t lead = rank - t.shape().size();
  Shape strides(rank, 0);
  for (size_t i = lead; i < rank; ++i) {
    strides[i] = t.shape()[i - lead] == 1 ? 0 : t.strides()[i - lead];
  }
  return strides;
}

}  // namespace lc
