// Dropout with a counter-based mask: element i of a draw is kept iff
// UniformAt(seed, offset, i) >= p (core/random.h), so the CUDA kernel
// reproduces the CPU mask exactly and the backward recomputes it instead of
// storing it. Inputs: float32, float64 or bfloat16 on the CPU or a CUDA
// device.
#ifndef LONGCTX_OPS_DROPOUT_H_
#define LONGCTX_OPS_DROPOUT_H_

#include "core/module.h"
#include "core/random.h"
#include "core/tensor.h"

namespace lc {

// x (any shape) -> same shape. Identity (returns x) unless training and
// p > 0; p must be in [0, 1). Otherwise takes offset = gen->NextOffset()
// (DefaultGenerator() when gen is null) and returns
//   out[i] = UniformAt(gen->seed(), offset, i) >= p ? x[i] / (1 - p) : 0
// for i the row-major index of each element of x.
Tensor Dropout(const Tensor& x, double p, bool training,
               Generator* gen = nullptr);

namespace nn {

// Dropout with probability p, active while the module is training; draws
// from the thread's DefaultGenerator().
class Dropout : public Module {
 public:
  explicit Dropout(double p);

  // x (any shape) -> same shape.
  Tensor Forward(const Tensor& x) const;

  double p() const { return p_; }

 private:
  double p_;
};

}  // namespace nn
}  // namespace lc

#endif  // LONGCTX_OPS_DROPOUT_H_
