#include "ops/embedding.h"

#include "ops/cpu_kernel.h"
#include "ops/shape_ops.h"

namespace lc {

Tensor Embedding(const Tensor& weight, const Tensor& indices) {
  CheckFloatingInputs("Embedding", {weight});
  LC_REQUIRE(weight.dim() == 2, "Embedding: weight has shape ",
             ShapeToString(weight.shape()), " (expected 2-D [V, D])");
  // Checked here (once: on CUDA the check waits for the device) so that the
  // message names Embedding and V.
  CheckIndicesInRange("Embedding", "indices", indices, weight.size(0),
                      weight.device());
  Shape out_shape = indices.shape();
  out_shape.push_back(weight.size(1));
  return internal::IndexSelectChecked(weight, 0, indices.reshape({-1}))
      .reshape(out_shape);
}

namespace nn {

Embedding::Embedding(int64_t num, int64_t dim, Generator& gen, DType dtype) {
  LC_REQUIRE(num > 0 && dim > 0, "nn::Embedding: num = ", num, ", dim = ", dim,
             " (expected both > 0)");
  weight_ = RegisterParameter("weight", Randn({num, dim}, gen, dtype));
}

Tensor Embedding::Forward(const Tensor& indices) const {
  return ::lc::Embedding(weight_, indices);
}

}  // namespace nn
}  // namespace lc
