#include "ops/shape_ops.h"

#include <algorithm>
#include <cstring>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/shape_ops_cuda.h"

namespace lc {
namespace {

// Sizes of x's dims before and after `dim`, multiplied out: x is then a dense
// [outer, x.size(dim), inner] array.
void OuterInner(const Shape& shape, int64_t dim, int64_t* outer,
                int64_t* inner) {
  *outer = NumElements(Shape(shape.begin(), shape.begin() + dim));
  *inner = NumElements(Shape(shape.begin() + dim + 1, shape.end()));
}

// out[o, l, :] = x[o, index[l], :] for dense x [outer, size, inner] and out
// [outer, num_indices, inner], copying rows of inner elements of elem_bytes.
void GatherRows(const char* x, const int64_t* index, int64_t outer,
                int64_t size, int64_t num_indices, int64_t inner,
                int64_t elem_bytes, char* out) {
  const int64_t row_bytes = inner * elem_bytes;
  const bool parallel = outer * num_indices * inner > 16384;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t j = 0; j < outer * num_indices; ++j) {
    const int64_t o = j / num_indices;
    const int64_t l = j % num_indices;
    std::memcpy(out + j * row_bytes, x + (o * size + index[l]) * row_bytes,
                row_bytes);
  }
}

// The backward of GatherRows: dx[o, index[l], :] += g[o, l, :] into a zeroed
// dx [outer, size, inner] (repeated indices accumulate).
template <typename T>
void IndexAddRows(const T* g, const int64_t* index, int64_t outer, int64_t size,
                  int64_t num_indices, int64_t inner, T* dx) {
  // Rows of one o never collide, so only the outer dim is split.
  const bool parallel = outer > 1 && outer * num_indices * inner > 16384;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t l = 0; l < num_indices; ++l) {
      const T* src = g + (o * num_indices + l) * inner;
      T* dst = dx + (o * size + index[l]) * inner;
      for (int64_t i = 0; i < inner; ++i) dst[i] += src[i];
    }
  }
}

// The row-major position of the first value of `indices` (dense int64 on
// its device) outside [0, size) that is not ignore_index (when has_ignore),
// or -1 when there is none.
using FirstInvalidIndexKernel = int64_t(const Tensor& indices, int64_t size,
                                        bool has_ignore, int64_t ignore_index);

// FirstInvalidIndexKernel on the CPU.
int64_t FirstInvalidIndexCpu(const Tensor& indices, int64_t size,
                             bool has_ignore, int64_t ignore_index) {
  const int64_t* values = indices.data<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    const bool ignored = has_ignore && values[i] == ignore_index;
    if ((values[i] < 0 || values[i] >= size) && !ignored) return i;
  }
  return -1;
}

// out[o, l, :] = x[o, index[l], :] for dense x [outer, size, inner] of any
// dtype, index (dense int64 [L], values in [0, size)) and out dense [outer, L,
// inner], all on one device.
using GatherRowsKernel = void(const Tensor& x, const Tensor& index,
                              int64_t outer, int64_t size, int64_t inner,
                              const Tensor& out);

// GatherRowsKernel on the CPU.
void GatherRowsCpu(const Tensor& x, const Tensor& index, int64_t outer,
                   int64_t size, int64_t inner, const Tensor& out) {
  GatherRows(static_cast<const char*>(x.raw_data()), index.data<int64_t>(),
             outer, size, index.numel(), inner, DTypeSize(x.dtype()),
             static_cast<char*>(out.raw_data()));
}

// The backward of GatherRowsKernel: dx[o, s, :] = sum of g[o, l, :] over the
// l with index[l] == s (0 when there is none), for dense floating g [outer,
// L, inner] and dx [outer, size, inner].
using IndexAddRowsKernel = void(const Tensor& g, const Tensor& index,
                                int64_t outer, int64_t size, int64_t inner,
                                const Tensor& dx);

// IndexAddRowsKernel on the CPU.
void IndexAddRowsCpu(const Tensor& g, const Tensor& index, int64_t outer,
                     int64_t size, int64_t inner, const Tensor& dx) {
  LC_DISPATCH_FLOATING(dx.dtype(), "IndexSelect", [&] {
    scalar_t* dx_data = dx.data<scalar_t>();
    std::fill_n(dx_data, dx.numel(), scalar_t(0));
    IndexAddRows(g.data<scalar_t>(), index.data<int64_t>(), outer, size,
                 index.numel(), inner, dx_data);
  });
}

constexpr PerDevice<FirstInvalidIndexKernel*> kFirstInvalidIndex = {
    FirstInvalidIndexCpu, internal::FirstInvalidIndexCuda};
constexpr PerDevice<GatherRowsKernel*> kGatherRows = {GatherRowsCpu,
                                                      internal::GatherRowsCuda};
constexpr PerDevice<IndexAddRowsKernel*> kIndexAddRows = {
    IndexAddRowsCpu, internal::IndexAddRowsCuda};

}  // namespace

void CheckIndexTensor(const char* op, const char* name, const Tensor& indices,
                      Device device) {
  LC_REQUIRE(indices.defined(), op, ": ", name, " is an undefined tensor");
  LC_REQUIRE(indices.dtype() == DType::kInt64, op, ": ", name, " has dtype ",
             DTypeName(indices.dtype()), " (expected int64)");
  // Validation, not a kernel choice: indices on the CPU serve every device.
  LC_REQUIRE(indices.device().is_cpu() || indices.device() == device, op, ": ",
             name, " is on ", indices.device().ToString(), " (expected cpu",
             device.is_cpu() ? "" : " or ",
             device.is_cpu() ? "" : device.ToString(), ")");
}

std::optional<IndexAt> FindInvalidIndex(const Tensor& indices, int64_t size,
                                        std::optional<int64_t> ignore_index) {
  const Tensor dense = indices.contiguous();
  const int64_t position = kFirstInvalidIndex.For(dense.device())(
      dense, size, ignore_index.has_value(), ignore_index.value_or(0));
  if (position < 0) return std::nullopt;
  const Tensor value =
      dense.reshape({-1}).slice(0, position, position + 1).to(Device::Cpu());
  return IndexAt{position, value.data<int64_t>()[0]};
}

void CheckIndicesInRange(const char* op, const char* name,
                         const Tensor& indices, int64_t size, Device device) {
  CheckIndexTensor(op, name, indices, device);
  const std::optional<IndexAt> bad = FindInvalidIndex(indices, size);
  LC_REQUIRE(!bad.has_value(), op, ": ", name, " value ", bad->value,
             " at position ", bad->position,
             " is out of range (expected 0 <= index < ", size, ")");
}

Tensor Concat(const std::vector<Tensor>& tensors, int64_t dim) {
  LC_REQUIRE(!tensors.empty(), "Concat: expected at least one tensor");
  for (size_t i = 0; i < tensors.size(); ++i) {
    LC_REQUIRE(tensors[i].defined(), "Concat: tensor ", i, " is undefined");
  }
  const Tensor& first = tensors[0];
  const int64_t d = NormalizeDim(dim, first.dim(), "Concat");
  Shape out_shape = first.shape();
  out_shape[d] = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    LC_REQUIRE(t.dtype() == first.dtype(), "Concat: tensor ", i, " has dtype ",
               DTypeName(t.dtype()), " but tensor 0 has ",
               DTypeName(first.dtype()), " (expected one dtype)");
    LC_REQUIRE(t.device() == first.device(), "Concat: tensor ", i, " is on ",
               t.device().ToString(), " but tensor 0 is on ",
               first.device().ToString());
    Shape expected = first.shape();
    expected[d] = t.dim() == first.dim() ? t.size(d) : 0;
    LC_REQUIRE(t.shape() == expected, "Concat: tensor ", i, " has shape ",
               ShapeToString(t.shape()), " but tensor 0 has ",
               ShapeToString(first.shape()),
               " (expected equal sizes except in dim ", d, ")");
    out_shape[d] += t.size(d);
  }
  Tensor out = Empty(out_shape, first.dtype(), first.device());
  int64_t start = 0;
  for (const Tensor& t : tensors) {
    CopyInto(out.slice(d, start, start + t.size(d)), t.detach());
    start += t.size(d);
  }
  if (NeedsGrad(tensors)) {
    Shape sizes;
    for (const Tensor& t : tensors) sizes.push_back(t.size(d));
    RecordOp("Concat", tensors, {&out},
             [sizes, d](const Tensors& g) -> Tensors {
               Tensors grads;
               int64_t begin = 0;
               for (int64_t size : sizes) {
                 grads.push_back(g[0].slice(d, begin, begin + size));
                 begin += size;
               }
               return grads;
             });
  }
  return out;
}

std::vector<Tensor> Split(const Tensor& x, const std::vector<int64_t>& sizes,
                          int64_t dim) {
  LC_REQUIRE(x.defined(), "Split: x is an undefined tensor");
  const int64_t d = NormalizeDim(dim, x.dim(), "Split");
  int64_t total = 0;
  for (int64_t size : sizes) {
    LC_REQUIRE(size >= 0, "Split: size ", size, " is negative (expected >= 0)");
    total += size;
  }
  LC_REQUIRE(total == x.size(d), "Split: sizes sum to ", total, " but dim ", d,
             " of x ", ShapeToString(x.shape()), " has size ", x.size(d),
             " (expected the sizes to sum to it)");
  std::vector<Tensor> pieces;
  int64_t start = 0;
  for (int64_t size : sizes) {
    pieces.push_back(x.slice(d, start, start + size));
    start += size;
  }
  return pieces;
}

Tensor IndexSelect(const Tensor& x, int64_t dim, const Tensor& indices) {
  LC_REQUIRE(x.defined(), "IndexSelect: x is an undefined tensor");
  const int64_t d = NormalizeDim(dim, x.dim(), "IndexSelect");
  CheckIndicesInRange("IndexSelect", "indices", indices, x.size(d), x.device());
  LC_REQUIRE(indices.dim() == 1, "IndexSelect: indices have shape ",
             ShapeToString(indices.shape()), " (expected 1-D)");
  return internal::IndexSelectChecked(x, d, indices);
}

namespace internal {

Tensor IndexSelectChecked(const Tensor& x, int64_t d, const Tensor& indices) {
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return IndexSelectChecked(x32, d, indices); },
        x);
  }

  const Tensor xc = x.detach().contiguous();
  const Tensor index = indices.to(x.device()).contiguous();
  const int64_t size = x.size(d);
  int64_t outer, inner;
  OuterInner(x.shape(), d, &outer, &inner);
  Shape out_shape = x.shape();
  out_shape[d] = index.numel();
  Tensor out = Empty(out_shape, x.dtype(), x.device());
  kGatherRows.For(x.device())(xc, index, outer, size, inner, out);
  if (NeedsGrad({x})) {
    RecordOp("IndexSelect", {x}, {&out}, /*saved=*/{index},
             [index, x_shape = x.shape(), dtype = x.dtype(), outer, size,
              inner](const Tensors& g) -> Tensors {
               const Tensor gc = g[0].contiguous();
               Tensor dx = Empty(x_shape, dtype, gc.device());
               kIndexAddRows.For(gc.device())(gc, index, outer, size, inner,
                                              dx);
               return {dx};
             });
  }
  return out;
}

}  // namespace internal
}  // namespace lc
