// Building blocks shared by the CPU kernels of ops/: dtype dispatch, input
// validation with clear errors, and a strided N-operand index loop (so ops
// work on non-contiguous views and broadcast inputs without copies).
#ifndef LONGCTX_OPS_CPU_KERNEL_H_
#define LONGCTX_OPS_CPU_KERNEL_H_

#include <array>
#include <cstdint>

#include "absl/types/span.h"
#include "core/status.h"
#include "core/tensor.h"

// Runs the lambda given as the last argument with `scalar_t` bound to float
// or double for DTYPE; other dtypes throw lc::Error naming OP_NAME.
//   LC_DISPATCH_FLOATING(x.dtype(), "Exp", [&] { Kernel<scalar_t>(...); });
#define LC_DISPATCH_FLOATING(DTYPE, OP_NAME, ...)                             \
  do {                                                                        \
    switch (DTYPE) {                                                          \
      case ::lc::DType::kFloat32: {                                           \
        using scalar_t = float;                                               \
        (__VA_ARGS__)();                                                      \
        break;                                                                \
      }                                                                       \
      case ::lc::DType::kFloat64: {                                           \
        using scalar_t = double;                                              \
        (__VA_ARGS__)();                                                      \
        break;                                                                \
      }                                                                       \
      default:                                                                \
        ::lc::ThrowInvalidArgument(OP_NAME,                                   \
                                   ": expected a float32 or float64 tensor, " \
                                   "got ",                                    \
                                   ::lc::DTypeName(DTYPE));                   \
    }                                                                         \
  } while (false)

namespace lc {

// Throws lc::Error unless every tensor is defined, of one floating dtype and
// on one device (the CPU or one CUDA device).
void CheckFloatingInputs(const char* op, absl::Span<const Tensor> inputs);

// Calls fn(o0, ..., oN-1) for every index of `shape` in row-major order,
// where oK is the element offset of that index under strides[K] (a stride of
// 0 broadcasts). Offsets are relative to each tensor's data<T>().
template <size_t N, typename Fn>
void ForEachOffset(const Shape& shape,
                   const std::array<const Shape*, N>& strides, Fn&& fn) {
  const int64_t rank = static_cast<int64_t>(shape.size());
  if (NumElements(shape) == 0) return;
  if (rank == 0) {
    std::array<int64_t, N> zero{};
    std::apply(fn, zero);
    return;
  }
  Shape index(rank, 0);
  std::array<int64_t, N> offsets{};
  const int64_t inner = shape[rank - 1];
  std::array<int64_t, N> inner_stride;
  for (size_t k = 0; k < N; ++k) inner_stride[k] = (*strides[k])[rank - 1];
  while (true) {
    std::array<int64_t, N> o = offsets;
    for (int64_t i = 0; i < inner; ++i) {
      std::apply(fn, o);
      for (size_t k = 0; k < N; ++k) o[k] += inner_stride[k];
    }
    // Advance the outer dims like an odometer.
    int64_t d = rank - 2;
    for (; d >= 0; --d) {
      ++index[d];
      for (size_t k = 0; k < N; ++k) offsets[k] += (*strides[k])[d];
      if (index[d] < shape[d]) break;
      for (size_t k = 0; k < N; ++k) offsets[k] -= index[d] * (*strides[k])[d];
      index[d] = 0;
    }
    if (d < 0) return;
  }
}

// Strides that read `t` as if broadcast to `shape` (stride 0 on broadcast
// dims); `shape` must be a valid broadcast of t.shape().
Shape BroadcastStrides(const Tensor& t, const Shape& shape);

}  // namespace lc

#endif  // LONGCTX_OPS_CPU_KERNEL_H_
