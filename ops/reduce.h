// Differentiable reductions: sum and mean over dims or over everything, max
// along one dim, and SumToShape (the reduction that undoes broadcasting).
// Inputs may be float32, float64 or bfloat16 (computed in float32), of any
// strides, on the CPU or a CUDA device. Sums are deterministic: on the CPU
// they accumulate in float64 in row-major order, on CUDA in the compute type
// (float64, or float32 for float32 and bfloat16) in the fixed order
// ops/reduce_cuda.h describes.
#ifndef LONGCTX_OPS_REDUCE_H_
#define LONGCTX_OPS_REDUCE_H_

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace lc {

// Sum of x over `dims` (distinct, each in [-rank, rank), at least one). The
// result has x's shape without those dims, or with them as size 1 when
// keepdim.
Tensor Sum(const Tensor& x, const std::vector<int64_t>& dims,
           bool keepdim = false);
// Sum of all elements of x; shape {}.
Tensor Sum(const Tensor& x);

// Mean over `dims` or over all elements; shapes as for Sum.
Tensor Mean(const Tensor& x, const std::vector<int64_t>& dims,
            bool keepdim = false);
Tensor Mean(const Tensor& x);

// The maximum of x along `dim` (whose size must be > 0): x's shape without
// that dim, or with it as size 1 when keepdim. NaN counts as the maximum. The
// gradient goes to the first maximal element of each line, like
// torch.max(x, dim).
Tensor Max(const Tensor& x, int64_t dim, bool keepdim = false);

// Sums x over the dims that broadcasting `shape` to x.shape() would expand
// (the leading dims x has beyond `shape`, and the dims where `shape` is 1),
// giving a tensor of `shape`. The gradient of a broadcasting op, reduced to
// an input's shape. Returns x itself when the shapes are equal.
Tensor SumToShape(const Tensor& x, const Shape& shape);

}  // namespace lc

#endif  // LONGCTX_OPS_REDUCE_H_
