// The affine layer y = x W^T + b, as a function and as a module with
// torch.nn.Linear's default initialization.
#ifndef LONGCTX_OPS_LINEAR_H_
#define LONGCTX_OPS_LINEAR_H_

#include <cstdint>

#include "core/module.h"
#include "core/random.h"
#include "core/tensor.h"

namespace lc {

// x [..., in], weight [out, in], bias [out] or undefined Tensor() ->
// [..., out] = x weight^T + bias, all of one floating dtype on one device (the
// CPU or CUDA). One GEMM for all leading dims when x's rows are evenly
// strided.
Tensor Linear(const Tensor& x, const Tensor& weight, const Tensor& bias);

namespace nn {

// Parameters "weight" [out, in] and, when `bias`, "bias" [out], both drawn
// from U(-1/sqrt(in), 1/sqrt(in)) like torch.nn.Linear's default
// (kaiming-uniform with a = sqrt(5)).
class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, bool bias, Generator& gen,
         DType dtype = DType::kFloat32);

  // x [..., in] -> [..., out].
  Tensor Forward(const Tensor& x) const;

  const Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }  // undefined without bias

 private:
  Tensor weight_;
  Tensor bias_;
};

}  // namespace nn
}  // namespace lc

#endif  // LONGCTX_OPS_LINEAR_H_
