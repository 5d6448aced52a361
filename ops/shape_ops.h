// Ops that move elements without arithmetic: concatenation, splitting into
// views and selecting slices by index; plus the validation of index tensors
// shared by every op that takes one.
#ifndef LONGCTX_OPS_SHAPE_OPS_H_
#define LONGCTX_OPS_SHAPE_OPS_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "core/tensor.h"

namespace lc {

// Joins tensors of one dtype, rank and device (the CPU or CUDA) along `dim`;
// all other sizes must agree. [..., a_i, ...] for each input -> [..., sum_i
// a_i, ...].
Tensor Concat(const std::vector<Tensor>& tensors, int64_t dim);

// Cuts x along `dim` into pieces of `sizes` (>= 0, summing to x.size(dim)).
// The pieces are views of x (Tensor::slice), in order.
std::vector<Tensor> Split(const Tensor& x, const std::vector<int64_t>& sizes,
                          int64_t dim);

// The slices of x at `indices` (int64, 1-D, each in [0, x.size(dim))) along
// `dim`: x [..., S, ...] -> [..., L, ...] for L indices, repeats allowed.
// Works for any dtype, on the CPU or CUDA (indices on the CPU or on x's
// device); its backward adds each gradient slice back at its index, on CUDA
// in a fixed order (bit-identical on every run).
Tensor IndexSelect(const Tensor& x, int64_t dim, const Tensor& indices);

namespace internal {
// IndexSelect along dim d (normalized) of 1-D indices the caller has already
// checked with CheckIndicesInRange: on CUDA that check waits for the device,
// so callers that check with their own message (Embedding) skip a second.
Tensor IndexSelectChecked(const Tensor& x, int64_t d, const Tensor& indices);
}  // namespace internal

// Throws lc::Error naming `op` and `name` unless `indices` is a defined int64
// tensor on the CPU or on `device` (an op's data device: index tensors of an
// op on CUDA may stay on the host).
void CheckIndexTensor(const char* op, const char* name, const Tensor& indices,
                      Device device = Device::Cpu());
// As CheckIndexTensor, and also unless every value lies in [0, size); the
// message names the first bad value, its position and `size`. Indices on a
// CUDA device are checked there, and the call waits for the result.
void CheckIndicesInRange(const char* op, const char* name,
                         const Tensor& indices, int64_t size,
                         Device device = Device::Cpu());

// A value of an index tensor and its row-major position.
struct IndexAt {
  int64_t position;
  int64_t value;
};
// The first value of `indices` (int64, on the CPU or a CUDA device, checked
// there) outside [0, size) that is not equal to `ignore_index` (when given),
// or nullopt when there is none.
std::optional<IndexAt> FindInvalidIndex(
    const Tensor& indices, int64_t size,
    std::optional<int64_t> ignore_index = std::nullopt);

}  // namespace lc

#endif  // LONGCTX_OPS_SHAPE_OPS_H_
