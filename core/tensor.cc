#include "core/tensor.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/status.h"
#include "core/tensor_cuda.h"

namespace lc {
namespace {

// Converts between element types; bfloat16 goes through float.
template <typename To, typename From>
To Cast(From v) {
  if constexpr (std::is_same_v<From, bfloat16>) {
    return Cast<To>(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, bfloat16>) {
    return bfloat16(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

double ReadElement(const void* ptr, DType dtype) {
  double out = 0;
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    out = Cast<double>(*static_cast<const T*>(ptr));
  });
  return out;
}

void WriteElement(void* ptr, DType dtype, double value) {
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    *static_cast<T*>(ptr) = Cast<T>(value);
  });
}

// Calls fn(dst_offset, src_offset) for every index of `shape`.
template <typename Fn>
void ForEachPair(const Shape& shape, const Shape& dst_strides,
                 const Shape& src_strides, Fn&& fn) {
  const int64_t rank = static_cast<int64_t>(shape.size());
  if (NumElements(shape) == 0) return;
  Shape index(rank, 0);
  int64_t d_off = 0, s_off = 0;
  while (true) {
    fn(d_off, s_off);
    int64_t d = rank - 1;
    for (; d >= 0; --d) {
      ++index[d];
      d_off += dst_strides[d];
      s_off += src_strides[d];
      if (index[d] < shape[d]) break;
      d_off -= index[d] * dst_strides[d];
      s_off -= index[d] * src_strides[d];
      index[d] = 0;
    }
    if (d < 0) return;
  }
}

// dst = src on the CPU, any strides and dtypes.
void CopyCpu(const Tensor& dst, const Tensor& src) {
  DispatchAll(dst.dtype(), [&](auto dst_tag) {
    using D = decltype(dst_tag);
    DispatchAll(src.dtype(), [&](auto src_tag) {
      using S = decltype(src_tag);
      D* d = static_cast<D*>(dst.raw_data());
      const S* s = static_cast<const S*>(src.raw_data());
      if (dst.is_contiguous() && src.is_contiguous()) {
        const int64_t n = dst.numel();
        for (int64_t i = 0; i < n; ++i) d[i] = Cast<D>(s[i]);
        return;
      }
      ForEachPair(dst.shape(), dst.strides(), src.strides(),
                  [&](int64_t i, int64_t j) { d[i] = Cast<D>(s[j]); });
    });
  });
}

// dst = src for two tensors on one CUDA device, any strides and dtypes.
void CopyCuda(const Tensor& dst, const Tensor& src) {
  if (dst.is_contiguous() && src.is_contiguous() &&
      dst.dtype() == src.dtype()) {
    CopyBytes(dst.raw_data(), dst.device(), src.raw_data(), src.device(),
              dst.numel() * DTypeSize(dst.dtype()));
    return;
  }
  StridedCopyCuda(dst.device().index, dst.shape(), dst.raw_data(), dst.dtype(),
                  dst.strides(), src.raw_data(), src.dtype(), src.strides());
}

// dst = src for two tensors on one device.
void CopyOnOneDevice(const Tensor& dst, const Tensor& src) {
  if (dst.device().is_cpu()) {
    CopyCpu(dst, src);
  } else {
    CopyCuda(dst, src);
  }
}

void CheckShape(const Shape& shape, const char* what) {
  for (int64_t s : shape) {
    LC_REQUIRE(s >= 0, what, ": negative size in shape ", ShapeToString(shape),
               " (expected sizes >= 0)");
  }
}

// A TensorImpl over `base`'s data with new geometry, sharing its storage and
// version counter, without autograd history. Aggregate initialization: no
// fresh counter is made only to be replaced.
std::shared_ptr<TensorImpl> ViewImpl(const Tensor& base, int64_t offset,
                                     Shape shape, Shape strides) {
  return std::make_shared<TensorImpl>(
      TensorImpl{base.storage(), offset, std::move(shape), std::move(strides),
                 base.dtype(), base.impl().version});
}

// A view of `base`'s storage with new geometry; records `backward` when
// base needs grad.
Tensor MakeView(const Tensor& base, int64_t offset, Shape shape, Shape strides,
                const char* name, BackwardFn backward) {
  Tensor view(ViewImpl(base, offset, std::move(shape), std::move(strides)));
  if (NeedsGrad({base})) RecordOp(name, {base}, {&view}, std::move(backward));
  return view;
}

// Resolves one -1 in `shape` against `numel`.
Shape InferShape(Shape shape, int64_t numel, const Shape& from) {
  int64_t known = 1;
  int infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      LC_REQUIRE(infer < 0, "reshape: more than one -1 in ",
                 ShapeToString(shape));
      infer = static_cast<int>(i);
    } else {
      LC_REQUIRE(shape[i] >= 0, "reshape: invalid size ", shape[i], " in ",
                 ShapeToString(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    LC_REQUIRE(known != 0 && numel % known == 0, "reshape: cannot reshape ",
               ShapeToString(from), " into ", ShapeToString(shape));
    shape[infer] = numel / known;
  }
  LC_REQUIRE(NumElements(shape) == numel, "reshape: cannot reshape ",
             ShapeToString(from), " (", numel, " elements) into ",
             ShapeToString(shape), " (", NumElements(shape), " elements)");
  return shape;
}

int64_t ElementOffset(const Tensor& t, const std::vector<int64_t>& index) {
  LC_REQUIRE(static_cast<int64_t>(index.size()) == t.dim(), "index of rank ",
             index.size(), " into a tensor of shape ", ShapeToString(t.shape()),
             " (expected rank ", t.dim(), ")");
  int64_t offset = t.offset();
  for (size_t d = 0; d < index.size(); ++d) {
    LC_REQUIRE(index[d] >= 0 && index[d] < t.shape()[d], "index ", index[d],
               " out of range for dim ", d, " of size ", t.shape()[d],
               " (tensor shape ", ShapeToString(t.shape()), ")");
    offset += index[d] * t.strides()[d];
  }
  return offset;
}

}  // namespace

int64_t Tensor::size(int64_t dim) const {
  return shape()[NormalizeDim(dim, this->dim(), "size")];
}

int64_t Tensor::stride(int64_t dim) const {
  return strides()[NormalizeDim(dim, this->dim(), "stride")];
}

bool Tensor::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int64_t d = dim() - 1; d >= 0; --d) {
    if (shape()[d] == 1) continue;
    if (strides()[d] != expected) return false;
    expected *= shape()[d];
  }
  return true;
}

void* Tensor::raw_data() const {
  return static_cast<char*>(storage()->data()) + offset() * DTypeSize(dtype());
}

double Tensor::item() const {
  LC_REQUIRE(numel() == 1, "item: tensor of shape ", ShapeToString(shape()),
             " has ", numel(), " elements (expected 1)");
  return at(std::vector<int64_t>(dim(), 0));
}

double Tensor::at(const std::vector<int64_t>& index) const {
  const int64_t offset = ElementOffset(*this, index);
  const int64_t size = DTypeSize(dtype());
  alignas(8) char buffer[8];
  CopyBytes(buffer, Device::Cpu(),
            static_cast<char*>(storage()->data()) + offset * size, device(),
            size);
  return ReadElement(buffer, dtype());
}

void Tensor::set(const std::vector<int64_t>& index, double value) const {
  const int64_t offset = ElementOffset(*this, index);
  const int64_t size = DTypeSize(dtype());
  alignas(8) char buffer[8];
  WriteElement(buffer, dtype(), value);
  bump_version();
  CopyBytes(static_cast<char*>(storage()->data()) + offset * size, device(),
            buffer, Device::Cpu(), size);
}

std::vector<double> Tensor::ToVector() const {
  Tensor host = device().is_cpu() ? *this : to(Device::Cpu());
  Tensor dense = Empty(shape(), DType::kFloat64);
  CopyInto(dense, host);
  const double* p = dense.data<double>();
  return std::vector<double>(p, p + dense.numel());
}

std::string Tensor::ToString() const {
  if (!defined()) return "Tensor(undefined)";
  std::ostringstream os;
  os << "Tensor(shape=" << ShapeToString(shape())
     << ", dtype=" << DTypeName(dtype()) << ", device=" << device().ToString();
  if (requires_grad()) os << ", requires_grad";
  os << ") [";
  const std::vector<double> values = ToVector();
  const size_t shown = std::min<size_t>(values.size(), 32);
  for (size_t i = 0; i < shown; ++i) os << (i ? ", " : "") << values[i];
  if (shown < values.size()) os << ", ... (" << values.size() << " total)";
  os << "]";
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) {
  return os << t.ToString();
}

Tensor Tensor::reshape(const Shape& new_shape) const {
  if (is_contiguous()) return view(new_shape);
  return contiguous().view(new_shape);
}

Tensor Tensor::view(const Shape& new_shape) const {
  LC_REQUIRE(is_contiguous(), "view: tensor of shape ", ShapeToString(shape()),
             " with strides ", ShapeToString(strides()),
             " is not contiguous (expected contiguous; use reshape to copy)");
  Shape resolved = InferShape(new_shape, numel(), shape());
  Shape strides = ContiguousStrides(resolved);
  const Shape old_shape = shape();
  return MakeView(*this, offset(), std::move(resolved), std::move(strides),
                  "View", [old_shape](const Tensors& g) -> Tensors {
                    return {g[0].reshape(old_shape)};
                  });
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  LC_REQUIRE(static_cast<int64_t>(dims.size()) == dim(),
             "permute: ", dims.size(), " dims given for a tensor of rank ",
             dim(), " (expected a permutation of all dims)");
  std::vector<int64_t> normalized(dims.size());
  std::vector<bool> seen(dims.size(), false);
  for (size_t i = 0; i < dims.size(); ++i) {
    normalized[i] = NormalizeDim(dims[i], dim(), "permute");
    LC_REQUIRE(!seen[normalized[i]], "permute: dim ", dims[i],
               " repeats (expected a permutation)");
    seen[normalized[i]] = true;
  }
  Shape new_shape(dims.size()), new_strides(dims.size());
  std::vector<int64_t> inverse(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    new_shape[i] = shape()[normalized[i]];
    new_strides[i] = strides()[normalized[i]];
    inverse[normalized[i]] = static_cast<int64_t>(i);
  }
  return MakeView(*this, offset(), std::move(new_shape), std::move(new_strides),
                  "Permute", [inverse](const Tensors& g) -> Tensors {
                    return {g[0].permute(inverse)};
                  });
}

Tensor Tensor::transpose(int64_t dim0, int64_t dim1) const {
  std::vector<int64_t> dims(dim());
  std::iota(dims.begin(), dims.end(), 0);
  std::swap(dims[NormalizeDim(dim0, dim(), "transpose")],
            dims[NormalizeDim(dim1, dim(), "transpose")]);
  return permute(dims);
}

Tensor Tensor::slice(int64_t dim, int64_t start, int64_t end,
                     int64_t step) const {
  const int64_t d = NormalizeDim(dim, this->dim(), "slice");
  LC_REQUIRE(step > 0, "slice: step ", step, " (expected > 0)");
  const int64_t size = shape()[d];
  if (start < 0) start += size;
  if (end < 0) end += size;
  start = std::clamp<int64_t>(start, 0, size);
  end = std::clamp<int64_t>(end, start, size);
  Shape new_shape = shape();
  Shape new_strides = strides();
  new_shape[d] = (end - start + step - 1) / step;
  new_strides[d] *= step;
  const Shape old_shape = shape();
  const DType dt = dtype();
  return MakeView(
      *this, offset() + start * strides()[d], std::move(new_shape),
      std::move(new_strides), "Slice",
      [old_shape, dt, d, start, end, step](const Tensors& g) -> Tensors {
        Tensor grad = Zeros(old_shape, dt, g[0].device());
        CopyInto(grad.slice(d, start, end, step), g[0]);
        return {grad};
      });
}

Tensor Tensor::unsqueeze(int64_t dim) const {
  const int64_t d = NormalizeDim(dim, this->dim() + 1, "unsqueeze");
  Shape new_shape = shape();
  Shape new_strides = strides();
  const int64_t stride =
      d < this->dim() ? strides()[d] * shape()[d] : int64_t{1};
  new_shape.insert(new_shape.begin() + d, 1);
  new_strides.insert(new_strides.begin() + d, stride);
  const Shape old_shape = shape();
  return MakeView(*this, offset(), std::move(new_shape), std::move(new_strides),
                  "Unsqueeze", [old_shape](const Tensors& g) -> Tensors {
                    return {g[0].reshape(old_shape)};
                  });
}

Tensor Tensor::squeeze(int64_t dim) const {
  const int64_t d = NormalizeDim(dim, this->dim(), "squeeze");
  LC_REQUIRE(shape()[d] == 1, "squeeze: dim ", dim, " has size ", shape()[d],
             " (expected 1)");
  Shape new_shape = shape();
  Shape new_strides = strides();
  new_shape.erase(new_shape.begin() + d);
  new_strides.erase(new_strides.begin() + d);
  const Shape old_shape = shape();
  return MakeView(*this, offset(), std::move(new_shape), std::move(new_strides),
                  "Squeeze", [old_shape](const Tensors& g) -> Tensors {
                    return {g[0].reshape(old_shape)};
                  });
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor out = Empty(shape(), dtype(), device());
  CopyInto(out, *this);
  if (NeedsGrad({*this})) {
    RecordOp("Clone", {*this}, {&out},
             [](const Tensors& g) -> Tensors { return {g[0]}; });
  }
  return out;
}

Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor out = Empty(shape(), dtype(), target);
  CopyInto(out, *this);
  if (NeedsGrad({*this})) {
    const Device source = device();
    RecordOp(
        "ToDevice", {*this}, {&out},
        [source](const Tensors& g) -> Tensors { return {g[0].to(source)}; });
  }
  return out;
}

Tensor Tensor::to(DType target) const {
  if (target == dtype()) return *this;
  Tensor out = Empty(shape(), target, device());
  CopyInto(out, *this);
  if (NeedsGrad({*this})) {
    LC_REQUIRE(IsFloating(target), "to: cannot differentiate a conversion to ",
               DTypeName(target));
    const DType source = dtype();
    RecordOp("ToDType", {*this}, {&out}, [source](const Tensors& g) -> Tensors {
      return {g[0].to(source)};
    });
  }
  return out;
}

const Tensor& Tensor::set_requires_grad(bool requires_grad) const {
  LC_REQUIRE(is_leaf(),
             "set_requires_grad: only leaf tensors (not made by an "
             "op) can change requires_grad; use detach() first");
  LC_REQUIRE(!requires_grad || IsFloating(dtype()), "set_requires_grad: a ",
             DTypeName(dtype()),
             " tensor cannot require grad (expected a floating dtype)");
  impl().requires_grad = requires_grad;
  return *this;
}

Tensor Tensor::grad() const {
  return impl().grad ? Tensor(impl().grad) : Tensor();
}

void Tensor::set_grad(const Tensor& grad) const {
  if (grad.defined()) {
    LC_REQUIRE(grad.shape() == shape() && grad.dtype() == dtype(),
               "set_grad: gradient ", ShapeToString(grad.shape()), " ",
               DTypeName(grad.dtype()), " does not match the tensor ",
               ShapeToString(shape()), " ", DTypeName(dtype()));
  }
  impl().grad = grad.impl_ptr();
}

Tensor Tensor::detach() const {
  return Tensor(ViewImpl(*this, offset(), shape(), strides()));
}

void Tensor::backward(const Tensor& grad_output, bool retain_graph) const {
  Backward({*this}, {grad_output}, retain_graph);
}

Tensor Empty(const Shape& shape, DType dtype, Device device) {
  CheckShape(shape, "Empty");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage =
      Storage::Allocate(NumElements(shape) * DTypeSize(dtype), device);
  impl->shape = shape;
  impl->strides = ContiguousStrides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor out = Empty(shape, dtype, device);
  if (device.is_cuda()) {
    FillCuda(device.index, out.raw_data(), dtype, out.numel(), value);
    return out;
  }
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    std::fill_n(out.data<T>(), out.numel(), Cast<T>(value));
  });
  return out;
}

Tensor Zeros(const Shape& shape, DType dtype, Device device) {
  return Full(shape, 0.0, dtype, device);
}

Tensor Ones(const Shape& shape, DType dtype, Device device) {
  return Full(shape, 1.0, dtype, device);
}

Tensor ZerosLike(const Tensor& t) {
  return Zeros(t.shape(), t.dtype(), t.device());
}

Tensor Arange(double start, double end, double step, DType dtype,
              Device device) {
  LC_REQUIRE(step != 0 && std::isfinite(step), "Arange: step ", step,
             " (expected finite and non-zero)");
  const double count = std::ceil((end - start) / step);
  const int64_t n = count > 0 ? static_cast<int64_t>(count) : 0;
  if (device.is_cuda()) {
    Tensor out = Empty({n}, dtype, device);
    ArangeCuda(device.index, out.raw_data(), dtype, n, start, step);
    return out;
  }
  std::vector<double> values(n);
  for (int64_t i = 0; i < n; ++i) values[i] = start + i * step;
  return FromVector(values, {n}, dtype, device);
}

Tensor FromVector(const std::vector<double>& values, const Shape& shape,
                  DType dtype, Device device) {
  CheckShape(shape, "FromVector");
  LC_REQUIRE(static_cast<int64_t>(values.size()) == NumElements(shape),
             "FromVector: ", values.size(), " values for shape ",
             ShapeToString(shape), " (expected ", NumElements(shape), ")");
  Tensor host = Empty(shape, dtype);
  DispatchAll(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* p = host.data<T>();
    for (size_t i = 0; i < values.size(); ++i) p[i] = Cast<T>(values[i]);
  });
  return host.to(device);
}

void CopyInto(const Tensor& dst, const Tensor& src) {
  LC_REQUIRE(dst.shape() == src.shape(), "CopyInto: destination shape ",
             ShapeToString(dst.shape()), " != source shape ",
             ShapeToString(src.shape()));
  dst.bump_version();
  if (dst.device() == src.device()) {
    CopyOnOneDevice(dst, src);
    return;
  }
  // Across devices: convert and pack on the source's device into dense
  // elements of the destination's dtype, move the bytes, and scatter them on
  // the destination's device when it is strided.
  Tensor packed = src;
  if (!src.is_contiguous() || src.dtype() != dst.dtype()) {
    packed = Empty(src.shape(), dst.dtype(), src.device());
    CopyInto(packed, src);
  }
  const Tensor landing =
      dst.is_contiguous() ? dst : Empty(dst.shape(), dst.dtype(), dst.device());
  CopyBytes(landing.raw_data(), landing.device(), packed.raw_data(),
            packed.device(), dst.numel() * DTypeSize(dst.dtype()));
  if (!dst.is_contiguous()) CopyOnOneDevice(dst, landing);
}

void AddInPlace(const Tensor& dst, const Tensor& src) {
  LC_REQUIRE(dst.shape() == src.shape() && dst.dtype() == src.dtype(),
             "AddInPlace: destination ", ShapeToString(dst.shape()), " ",
             DTypeName(dst.dtype()), " vs source ", ShapeToString(src.shape()),
             " ", DTypeName(src.dtype()),
             " (expected the same shape and dtype)");
  LC_REQUIRE(dst.device() == src.device(), "AddInPlace: destination on ",
             dst.device().ToString(), " and source on ",
             src.device().ToString(), " (expected one device)");
  LC_REQUIRE(dst.device().is_cpu() || IsFloating(dst.dtype()), "AddInPlace on ",
             dst.device().ToString(), ": dtype ", DTypeName(dst.dtype()),
             " (expected float32, float64 or bfloat16)");
  dst.bump_version();
  if (dst.device().is_cuda()) {
    AddInPlaceCuda(dst.device().index, dst.shape(), dst.dtype(), dst.raw_data(),
                   dst.strides(), src.raw_data(), src.strides());
    return;
  }
  DispatchAll(dst.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* d = static_cast<T*>(dst.raw_data());
    const T* s = static_cast<const T*>(src.raw_data());
    ForEachPair(dst.shape(), dst.strides(), src.strides(),
                [&](int64_t i, int64_t j) {
                  d[i] = Cast<T>(Cast<double>(d[i]) + Cast<double>(s[j]));
                });
  });
}

}  // namespace lc
