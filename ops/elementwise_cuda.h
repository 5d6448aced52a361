// The CUDA twin of MapElements (ops/elementwise_kernel.h): one element-wise
// map kernel, explicitly instantiated in elementwise_cuda.cu for every functor
// of ops/elementwise_functors.h that an op uses (a functor without an
// instantiation is a link error, never a silent CPU fallback).
#ifndef LONGCTX_OPS_ELEMENTWISE_CUDA_H_
#define LONGCTX_OPS_ELEMENTWISE_CUDA_H_

#include <array>
#include <cstddef>

#include "core/shape.h"
#include "core/tensor.h"

namespace lc {
namespace internal {

// out[i] = fn(inputs[0][i], ..., inputs[N-1][i]) for every row-major index i
// of `shape`, input k read at the offsets of `strides[k]` (its strides as if
// broadcast to `shape`: 0 on broadcast dims). `out` is a contiguous tensor of
// `shape`; inputs and out are CUDA tensors of one device and one floating
// dtype (bfloat16 computes in float32 registers). Runs on the device's
// current stream; `op` names the op in errors.
template <size_t N, typename Fn>
void MapElementsCuda(const char* op, const Shape& shape,
                     const std::array<Shape, N>& strides,
                     const std::array<Tensor, N>& inputs, const Tensor& out,
                     const Fn& fn);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_ELEMENTWISE_CUDA_H_
