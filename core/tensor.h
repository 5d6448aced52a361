// Tensor: a view (offset, shape, strides, dtype) onto a shared Storage, plus
// the autograd state that links it to the op that made it. Views (reshape,
// permute, transpose, strided slice) share storage and are differentiable;
// factories make new tensors on any device.
#ifndef LONGCTX_CORE_TENSOR_H_
#define LONGCTX_CORE_TENSOR_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/memory.h"
#include "core/shape.h"
#include "core/status.h"

namespace lc {

class Node;

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape;
  Shape strides;  // in elements
  DType dtype = DType::kFloat32;
  // In-place writes to the data so far, shared by every view and detached
  // alias of it: see NOTE [ Version counters ] in core/autograd.h.
  std::shared_ptr<uint64_t> version = std::make_shared<uint64_t>(0);

  // Autograd. A leaf (grad_fn == nullptr) with requires_grad accumulates its
  // gradient into `grad`; a non-leaf is output `output_nr` of `grad_fn`.
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;
  int output_nr = 0;
  std::shared_ptr<TensorImpl> grad;
  std::weak_ptr<Node> grad_accumulator;  // cached AccumulateGrad of a leaf
};

class Tensor {
 public:
  Tensor() = default;  // undefined: holds no data
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  bool defined() const { return impl_ != nullptr; }

  // Metadata.
  const Shape& shape() const { return impl().shape; }
  int64_t dim() const { return static_cast<int64_t>(impl().shape.size()); }
  int64_t size(int64_t dim) const;  // negative dims count from the end
  const Shape& strides() const { return impl().strides; }
  int64_t stride(int64_t dim) const;
  int64_t offset() const { return impl().offset; }
  int64_t numel() const { return NumElements(impl().shape); }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device(); }
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return impl().storage; }
  // How many in-place writes (set, CopyInto, AddInPlace, an optimizer step)
  // the data of this tensor and its views have had: NOTE [ Version counters ]
  // in core/autograd.h.
  uint64_t version() const { return *impl().version; }
  // Counts one in-place write. set, CopyInto and AddInPlace call it; code
  // that writes a tensor others may hold through data<T>() must too.
  void bump_version() const { ++*impl().version; }

  // Pointer to this view's first element. data<T>() checks that T matches the
  // dtype; both work for any device (a CUDA pointer for CUDA tensors).
  void* raw_data() const;
  template <typename T>
  T* data() const {
    LC_CHECK(DTypeOf<T>::value == dtype())
        << "data<" << DTypeName(DTypeOf<T>::value) << ">() on a "
        << DTypeName(dtype()) << " tensor";
    return static_cast<T*>(raw_data());
  }

  // Element access as double, for tests and printing (copies CUDA data to
  // the host first). Index checks throw lc::Error. set is an in-place write
  // (it bumps the version).
  double item() const;
  double at(const std::vector<int64_t>& index) const;
  void set(const std::vector<int64_t>& index, double value) const;
  // All elements in row-major order.
  std::vector<double> ToVector() const;
  // Shape, dtype, device and (up to a few dozen) values.
  std::string ToString() const;

  // Views and copies. All are differentiable.
  // Same elements in a new shape (one size may be -1); a view when the
  // strides allow it, a copy otherwise.
  Tensor reshape(const Shape& shape) const;
  // Like reshape, but never copies: throws unless the tensor is contiguous.
  Tensor view(const Shape& shape) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor transpose(int64_t dim0, int64_t dim1) const;
  // Elements start, start+step, ... < end along `dim` (end is clamped to the
  // size; negative start/end count from the end). A view: dilation is a
  // strided slice, not a copy.
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;  // dim must have size 1
  Tensor contiguous() const;          // itself when already contiguous
  Tensor clone() const;               // always a new dense buffer
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;

  // Autograd.
  bool requires_grad() const { return impl().requires_grad; }
  // Only for leaves (tensors no op made); returns *this for chaining.
  const Tensor& set_requires_grad(bool requires_grad) const;
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  const std::shared_ptr<Node>& grad_fn() const { return impl().grad_fn; }
  int output_nr() const { return impl().output_nr; }
  // The accumulated gradient of a leaf; undefined before any backward.
  Tensor grad() const;
  void set_grad(const Tensor& grad) const;
  // Shares the data, without autograd history and requires_grad = false.
  Tensor detach() const;
  // Backpropagates from this tensor. `grad_output` may be omitted for a
  // tensor of one element (it is then 1). Unless retain_graph, the graph's
  // saved tensors are freed and a second backward through it throws.
  void backward(const Tensor& grad_output = Tensor(),
                bool retain_graph = false) const;

  TensorImpl& impl() const {
    LC_CHECK(impl_ != nullptr) << "use of an undefined tensor";
    return *impl_;
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// Factories. Sizes must be >= 0.
Tensor Empty(const Shape& shape, DType dtype = DType::kFloat32,
             Device device = Device::Cpu());
Tensor Zeros(const Shape& shape, DType dtype = DType::kFloat32,
             Device device = Device::Cpu());
Tensor Ones(const Shape& shape, DType dtype = DType::kFloat32,
            Device device = Device::Cpu());
Tensor Full(const Shape& shape, double value, DType dtype = DType::kFloat32,
            Device device = Device::Cpu());
// start, start+step, ... < end, as a 1-D tensor.
Tensor Arange(double start, double end, double step = 1,
              DType dtype = DType::kFloat32, Device device = Device::Cpu());
// A tensor of `shape` holding `values` (row-major) converted to `dtype`.
Tensor FromVector(const std::vector<double>& values, const Shape& shape,
                  DType dtype = DType::kFloat32, Device device = Device::Cpu());
Tensor ZerosLike(const Tensor& t);

// Element-wise dst = src for tensors of the same shape, any strides, dtypes
// and devices (not differentiable, an in-place write of dst; dst must not
// overlap src).
void CopyInto(const Tensor& dst, const Tensor& src);
// dst += src for same-shape tensors of the same dtype and device (not
// differentiable, an in-place write of dst; on CUDA a floating dtype). Used to
// accumulate gradients.
void AddInPlace(const Tensor& dst, const Tensor& src);

}  // namespace lc

#endif  // LONGCTX_CORE_TENSOR_H_
