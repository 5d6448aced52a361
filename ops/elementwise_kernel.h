// Templates shared by the CPU kernels of ops/ (internal to ops/): the
// bfloat16-computes-in-float32 rule, an N-ary element-wise map with NumPy
// broadcasting, and the driver of differentiable unary element-wise ops.
#ifndef LONGCTX_OPS_ELEMENTWISE_KERNEL_H_
#define LONGCTX_OPS_ELEMENTWISE_KERNEL_H_

#include <array>
#include <cstdint>
#include <utility>

#include "core/autograd.h"
#include "core/tensor.h"
#include "ops/cpu_kernel.h"

namespace lc {

// bfloat16 is a storage type: an op given bfloat16 inputs returns
// op(float32 copies of the inputs) converted back to bfloat16.
// Differentiable, since Tensor::to is. Typical use at the top of an op:
//   if (x.dtype() == DType::kBFloat16) return ComputeInFloat32(Exp, x);
template <typename Op, typename... Inputs>
Tensor ComputeInFloat32(const Op& op, const Inputs&... inputs) {
  return op(inputs.to(DType::kFloat32)...).to(DType::kBFloat16);
}

namespace internal {

// out[i] = fn(in_0[i], ..., in_{N-1}[i]) over `shape`; `dense` means every
// input is contiguous with exactly `shape`, so offsets equal i.
template <typename T, typename Fn, size_t... K>
void MapElementsKernel(std::index_sequence<K...>, const Shape& shape,
                       const std::array<Shape, sizeof...(K) + 1>& strides,
                       const std::array<const T*, sizeof...(K)>& in, T* out,
                       bool dense, const Fn& fn) {
  if (dense) {
    const int64_t n = NumElements(shape);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(fn(in[K][i]...));
    return;
  }
  ForEachOffset<sizeof...(K) + 1>(
      shape, {&strides[0], &strides[K + 1]...},
      [&](int64_t out_offset, auto... in_offsets) {
        out[out_offset] = static_cast<T>(fn(in[K][in_offsets]...));
      });
}

}  // namespace internal

// Returns a new contiguous tensor `out` of `shape` with
//   out[i] = fn(inputs[0][i], ..., inputs[N-1][i]),
// each input read as if broadcast to `shape` (any strides; no copies). The
// inputs are float32 or float64 CPU tensors of one dtype; fn is called with
// and returns that C++ type (a generic lambda). Not differentiable.
template <size_t N, typename Fn>
Tensor MapElements(const char* op, const std::array<Tensor, N>& inputs,
                   const Shape& shape, const Fn& fn) {
  CheckFloatingCpuInputs(op, inputs);
  Tensor out = Empty(shape, inputs[0].dtype());
  std::array<Shape, N + 1> strides;
  strides[0] = out.strides();
  bool dense = true;
  for (size_t k = 0; k < N; ++k) {
    strides[k + 1] = BroadcastStrides(inputs[k], shape);
    dense = dense && inputs[k].shape() == shape && inputs[k].is_contiguous();
  }
  LC_DISPATCH_FLOATING(out.dtype(), op, [&] {
    std::array<const scalar_t*, N> in;
    for (size_t k = 0; k < N; ++k) in[k] = inputs[k].template data<scalar_t>();
    internal::MapElementsKernel(std::make_index_sequence<N>(), shape, strides,
                                in, out.data<scalar_t>(), dense, fn);
  });
  return out;
}

// What the backward of a unary element-wise op reads besides the gradient.
enum class SavedForBackward { kNothing, kInput, kOutput };

// A differentiable unary element-wise op on any float tensor x (any strides;
// bfloat16 computes in float32): returns y = forward(x) element by element,
// contiguous and of x's shape. Its backward returns
// backward(grad_y, saved) -> grad_x, where `saved` is x, y or an undefined
// tensor as `saved_for_backward` says.
template <typename Forward, typename Backward>
Tensor UnaryOp(const char* op, const Tensor& x,
               SavedForBackward saved_for_backward, const Forward& forward,
               const Backward& backward) {
  CheckFloatingCpuInputs(op, {x});
  if (x.dtype() == DType::kBFloat16) {
    return ComputeInFloat32(
        [&](const Tensor& x32) {
          return UnaryOp(op, x32, saved_for_backward, forward, backward);
        },
        x);
  }
  Tensor y = MapElements<1>(op, {x}, x.shape(), forward);
  if (NeedsGrad({x})) {
    Tensor saved;
    if (saved_for_backward == SavedForBackward::kInput) saved = x.detach();
    if (saved_for_backward == SavedForBackward::kOutput) saved = y.detach();
    RecordOp(op, {x}, {&y}, [saved, backward](const Tensors& g) -> Tensors {
      return {backward(g[0], saved)};
    });
  }
  return y;
}

// A backward for UnaryOp whose gradient is element-wise:
// grad_x[i] = fn(grad_y[i], saved[i]).
template <typename Fn>
auto ElementwiseBackward(const char* op, const Fn& fn) {
  return [op, fn](const Tensor& grad_y, const Tensor& saved) {
    return MapElements<2>(op, {grad_y, saved}, saved.shape(), fn);
  };
}

}  // namespace lc

#endif  // LONGCTX_OPS_ELEMENTWISE_KERNEL_H_
