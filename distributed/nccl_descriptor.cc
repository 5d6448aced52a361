#include "distributed/nccl_descriptor.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/shape.h"

namespace lc {
namespace distributed_internal {

bool SameDescriptor(const Descriptor& a, const Descriptor& b) {
  return std::memcmp(&a, &b, sizeof(Descriptor)) == 0;
}

std::string DescriptorTensor(const Descriptor& d) {
  const Shape shape(d.dims, d.dims + std::clamp<int64_t>(d.ndim, 0, kMaxDims));
  const bool known =
      d.dtype >= 0 && d.dtype <= static_cast<int64_t>(DType::kUInt8);
  return absl::StrCat(ShapeToString(shape), " ",
                      known ? DTypeName(static_cast<DType>(d.dtype))
                            : absl::StrCat("dtype #", d.dtype));
}

Descriptor Describe(int64_t op, int64_t root, const Tensor& t) {
  Descriptor d;
  d.op = op;
  d.root = root;
  d.dtype = static_cast<int64_t>(t.dtype());
  d.ndim = t.dim();
  for (int64_t i = 0; i < t.dim(); ++i) d.dims[i] = t.size(i);
  return d;
}

}  // namespace distributed_internal
}  // namespace lc
