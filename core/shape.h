// Shapes and strides (in elements), and the small helpers every op needs:
// element counts, contiguous strides, dim normalization, broadcasting.
#ifndef LONGCTX_CORE_SHAPE_H_
#define LONGCTX_CORE_SHAPE_H_

#include <cstdint>
#include <string>
#include <vector>

namespace lc {

using Shape = std::vector<int64_t>;

// Product of the sizes; 1 for a scalar (empty shape).
int64_t NumElements(const Shape& shape);
// Row-major strides of a dense tensor of `shape`.
Shape ContiguousStrides(const Shape& shape);
// "[2, 3, 4]".
std::string ShapeToString(const Shape& shape);
// Maps dim in [-rank, rank) to [0, rank); throws lc::Error naming `what`
// (the op) otherwise.
int64_t NormalizeDim(int64_t dim, int64_t rank, const char* what);
// NumPy broadcasting of two shapes; throws lc::Error naming `what` when they
// do not broadcast.
Shape BroadcastShapes(const Shape& a, const Shape& b, const char* what);

}  // namespace lc

#endif  // LONGCTX_CORE_SHAPE_H_
