// Templates shared by the element-wise ops of ops/ (internal to ops/): an
// N-ary element-wise map with NumPy broadcasting on the CPU or CUDA, and the
// driver of differentiable unary element-wise ops.
#ifndef LONGCTX_OPS_ELEMENTWISE_KERNEL_H_
#define LONGCTX_OPS_ELEMENTWISE_KERNEL_H_

#include <array>
#include <cstdint>
#include <utility>

#include "core/autograd.h"
#include "core/tensor.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/elementwise_cuda.h"

namespace lc {

// out[i] = fn(inputs[0][i], ..., inputs[N-1][i]) for every row-major index i
// of `shape`, input k read at the offsets of `strides[k]` (its strides as if
// broadcast to `shape`); `out` is a contiguous tensor of `shape`, inputs and
// out of one floating dtype on one device; `op` names the op in errors.
template <size_t N, typename Fn>
using MapElementsKernel = void(const char* op, const Shape& shape,
                               const std::array<Shape, N>& strides,
                               const std::array<Tensor, N>& inputs,
                               const Tensor& out, const Fn& fn);

namespace internal {

// out[i] = fn(in_0[i], ..., in_{N-1}[i]) over `shape`, in_k read at the
// offsets of in_strides[k], out at those of out_strides; `dense` means every
// input is contiguous with exactly `shape`, so offsets equal i.
template <typename T, typename Fn, size_t... K>
void MapElementsLoop(std::index_sequence<K...>, const Shape& shape,
                     const Shape& out_strides,
                     const std::array<Shape, sizeof...(K)>& in_strides,
                     const std::array<const T*, sizeof...(K)>& in, T* out,
                     bool dense, const Fn& fn) {
  if (dense) {
    const int64_t n = NumElements(shape);
    for (int64_t i = 0; i < n; ++i) out[i] = fn(in[K][i]...);
    return;
  }
  ForEachOffset<sizeof...(K) + 1>(shape, {&out_strides, &in_strides[K]...},
                                  [&](int64_t out_offset, auto... in_offsets) {
                                    out[out_offset] = fn(in[K][in_offsets]...);
                                  });
}

// MapElementsKernel on the CPU, for float32 and float64.
template <size_t N, typename Fn>
void MapElementsCpu(const char* op, const Shape& shape,
                    const std::array<Shape, N>& strides,
                    const std::array<Tensor, N>& inputs, const Tensor& out,
                    const Fn& fn) {
  bool dense = true;
  for (size_t k = 0; k < N; ++k) {
    dense = dense && inputs[k].shape() == shape && inputs[k].is_contiguous();
  }
  LC_DISPATCH_FLOATING(out.dtype(), op, [&] {
    std::array<const scalar_t*, N> in;
    for (size_t k = 0; k < N; ++k) in[k] = inputs[k].template data<scalar_t>();
    MapElementsLoop(std::make_index_sequence<N>(), shape, out.strides(),
                    strides, in, out.template data<scalar_t>(), dense, fn);
  });
}

}  // namespace internal

// Returns a new contiguous tensor `out` of `shape` on the inputs' device with
//   out[i] = fn(inputs[0][i], ..., inputs[N-1][i]),
// each input read as if broadcast to `shape` (any strides; no copies). fn is
// a functor of ops/elementwise_functors.h, called with and returning the
// compute type. The inputs are of one floating dtype on one device: float32
// or float64 on the CPU; float32, float64 or bfloat16 (computed in float32
// registers) on CUDA, where the map runs the kernel of ops/elementwise_cuda.cu
// instantiated for fn. Not differentiable.
template <size_t N, typename Fn>
Tensor MapElements(const char* op, const std::array<Tensor, N>& inputs,
                   const Shape& shape, const Fn& fn) {
  static constexpr PerDevice<MapElementsKernel<N, Fn>*> kMapElements = {
      internal::MapElementsCpu<N, Fn>, internal::MapElementsCuda<N, Fn>};
  CheckFloatingInputs(op, inputs);
  Tensor out = Empty(shape, inputs[0].dtype(), inputs[0].device());
  std::array<Shape, N> strides;
  for (size_t k = 0; k < N; ++k) {
    strides[k] = BroadcastStrides(inputs[k], shape);
  }
  kMapElements.For(out.device())(op, shape, strides, inputs, out, fn);
  return out;
}

// What the backward of a unary element-wise op reads besides the gradient.
enum class SavedForBackward { kNothing, kInput, kOutput };

// A differentiable unary element-wise op on any float tensor x (any strides;
// bfloat16 computes in float32, through conversion copies on the CPU and in
// registers on CUDA): returns y = forward(x) element by element (forward a
// functor for MapElements), contiguous and of x's shape. Its backward returns
// backward(grad_y, saved) -> grad_x, where `saved` is x, y or an undefined
// tensor as `saved_for_backward` says.
template <typename Forward, typename Backward>
Tensor UnaryOp(const char* op, const Tensor& x,
               SavedForBackward saved_for_backward, const Forward& forward,
               const Backward& backward) {
  CheckFloatingInputs(op, {x});
  if (ComputesOnFloat32Copies(x)) {
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
    RecordOp(op, {x}, {&y}, /*saved=*/{saved},
             [saved, backward](const Tensors& g) -> Tensors {
               return {backward(g[0], saved)};
             });
  }
  return y;
}

// A backward for UnaryOp whose gradient is element-wise:
// grad_x[i] = fn(grad_y[i], saved[i]) for a binary functor fn.
template <typename Fn>
auto ElementwiseBackward(const char* op, const Fn& fn) {
  return [op, fn](const Tensor& grad_y, const Tensor& saved) {
    return MapElements<2>(op, {grad_y, saved}, saved.shape(), fn);
  };
}

}  // namespace lc

#endif  // LONGCTX_OPS_ELEMENTWISE_KERNEL_H_
