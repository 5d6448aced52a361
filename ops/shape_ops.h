// Ops that move elements without arithmetic: concatenation, splitting into
// views and selecting slices by index; plus the validation of index tensors
// shared by every op that takes one.
#ifndef LONGCTX_OPS_SHAPE_OPS_H_
#define LONGCTX_OPS_SHAPE_OPS_H_

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace lc {

// Joins tensors of one dtype and rank along `dim`; all other sizes must
// agree. [..., a_i, ...] for each input -> [..., sum_i a_i, ...].
Tensor Concat(const std::vector<Tensor>& tensors, int64_t dim);

// Cuts x along `dim` into pieces of `sizes` (>= 0, summing to x.size(dim)).
// The pieces are views of x (Tensor::slice), in order.
std::vector<Tensor> Split(const Tensor& x, const std::vector<int64_t>& sizes,
                          int64_t dim);

// The slices of x at `indices` (int64, 1-D, each in [0, x.size(dim))) along
// `dim`: x [..., S, ...] -> [..., L, ...] for L indices, repeats allowed.
// Works for any dtype; its backward adds each gradient slice back at its
// index.
Tensor IndexSelect(const Tensor& x, int64_t dim, const Tensor& indices);

// Throws lc::Error naming `op` and `name` unless `indices` is a defined int64
// CPU tensor.
void CheckIndexTensor(const char* op, const char* name, const Tensor& indices);
// As CheckIndexTensor, and also unless every value lies in [0, size); the
// message names the first bad value, its position and `size`.
void CheckIndicesInRange(const char* op, const char* name,
                         const Tensor& indices, int64_t size);

}  // namespace lc

#endif  // LONGCTX_OPS_SHAPE_OPS_H_
