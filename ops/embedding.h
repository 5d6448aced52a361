// Token embeddings: rows of a [V, D] table looked up by int64 ids, as a
// function and as a module.
#ifndef LONGCTX_OPS_EMBEDDING_H_
#define LONGCTX_OPS_EMBEDDING_H_

#include <cstdint>

#include "core/module.h"
#include "core/random.h"
#include "core/tensor.h"

namespace lc {

// weight [V, D] (floating), indices (int64, any shape, each in [0, V); on the
// CPU or on weight's device) -> [indices.shape..., D]:
// out[..., :] = weight[indices[...], :]. The gradient of weight adds each
// output row's gradient into its row (repeated ids accumulate; on CUDA in a
// fixed order, so bit-identical on every run); indices get none. On CUDA the
// range check of device indices waits for the device.
Tensor Embedding(const Tensor& weight, const Tensor& indices);

namespace nn {

// An embedding table, parameter "weight" [num, dim], initialized N(0, 1) like
// torch.nn.Embedding.
class Embedding : public Module {
 public:
  Embedding(int64_t num, int64_t dim, Generator& gen,
            DType dtype = DType::kFloat32);

  // indices (int64, any shape) -> [indices.shape..., dim].
  Tensor Forward(const Tensor& indices) const;

  const Tensor& weight() const { return weight_; }

 private:
  Tensor weight_;
};

}  // namespace nn
}  // namespace lc

#endif  // LONGCTX_OPS_EMBEDDING_H_
