#include "core/shape.h"

#include <algorithm>

#include "absl/strings/str_join.h"
#include "core/status.h"

namespace lc {

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Shape ContiguousStrides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t stride = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = stride;
    stride *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

std::string ShapeToString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t NormalizeDim(int64_t dim, int64_t rank, const char* what) {
  const int64_t lo = rank == 0 ? -1 : -rank;
  const int64_t hi = rank == 0 ? 1 : rank;
  LC_REQUIRE(dim >= lo && dim < hi, what, ": dim ", dim,
             " is out of range for a tensor of rank ", rank, " (expected [", lo,
             ", ", hi, "))");
  return dim < 0 ? dim + std::max<int64_t>(rank, 1) : dim;
}

Shape BroadcastShapes(const Shape& a, const Shape& b, const char* what) {
  const size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    const int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    const int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    LC_REQUIRE(da == db || da == 1 || db == 1, what, ": shapes ",
               ShapeToString(a), " and ", ShapeToString(b),
               " do not broadcast (dim ", i, ": ", da, " vs ", db, ")");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

}  // namespace lc
