// CUDA kernels of ops/reduce.cc: scaled sums over any set of dims and the
// maximum along one dim with its gradient, for float32, float64 and bfloat16
// tensors of any strides. Deterministic: no atomics, and the summation order
// depends only on the shapes and strides, so equal inputs give bit-identical
// results on every run and every device.
#ifndef LONGCTX_OPS_REDUCE_CUDA_H_
#define LONGCTX_OPS_REDUCE_CUDA_H_

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace lc {
namespace internal {

// out[m] = scale * sum of x over the dims d < x.dim() where mask[d], for m
// the row-major index of the kept dims (a scalar is its own sum).
// `out` is a contiguous CUDA tensor of x's dtype with one element per m.
// Accumulates in the compute type (float64 for float64, float32 for float32
// and bfloat16) in a fixed order: each output's elements r (row-major over
// the reduced dims) are cut into slices of consecutive r; within a slice,
// thread t of the output's group of G threads adds r = t, t + G, ... in
// order, the G partial sums are added in a fixed tree, and the slices' sums
// are added in a fixed order. G and the slice count depend only on the
// shapes and strides.
void SumCuda(const Tensor& x, const std::vector<bool>& mask, double scale,
             const Tensor& out);

// The maximum of x along dim d (size > 0; d is ignored for a scalar, one
// line of length 1) for every line m (row-major over x's shape without d):
// out[m] (contiguous, x's dtype) and argmax[m] (contiguous int64), the index
// along d of the first maximal element, NaN counting as the maximum, as on
// the CPU.
void MaxCuda(const Tensor& x, int64_t d, const Tensor& out,
             const Tensor& argmax);

// The gradient of MaxCuda: gx (contiguous, x's shape and dtype) = g_keep[m]
// at index argmax[m] along d of line m and 0 elsewhere; g_keep has x's shape
// with dim d of size 1 (any strides).
void MaxBackwardCuda(const Tensor& g_keep, const Tensor& argmax, int64_t d,
                     const Tensor& gx);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_REDUCE_CUDA_H_
