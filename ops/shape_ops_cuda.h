// CUDA kernels of ops/shape_ops.cc: IndexSelect's gather and its
// deterministic backward (a stable sort of the indices, then one ordered sum
// per destination row; no atomics), and the range check of index tensors
// that live on a CUDA device.
#ifndef LONGCTX_OPS_SHAPE_OPS_CUDA_H_
#define LONGCTX_OPS_SHAPE_OPS_CUDA_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {
namespace internal {

// The row-major position of the first value of `indices` (dense int64 on a
// CUDA device) outside [0, size) that is not ignore_index (when has_ignore),
// or -1 when there is none. Waits for the result (a copy to the host).
int64_t FirstInvalidIndexCuda(const Tensor& indices, int64_t size,
                              bool has_ignore, int64_t ignore_index);

// out[o, l, i] = x[o, index[l], i] for dense x [outer, size, inner] of any
// dtype, index (dense int64 [L], values in [0, size)) and out dense [outer, L,
// inner], all on one CUDA device.
void GatherRowsCuda(const Tensor& x, const Tensor& index, int64_t outer,
                    int64_t size, int64_t inner, const Tensor& out);

// The backward of GatherRowsCuda: dx[o, s, i] = sum of g[o, l, i] over the l
// with index[l] == s (0 when there is none), for dense floating g [outer, L,
// inner] and dx [outer, size, inner]. The terms of a sum are added in
// increasing l, in float32 (float64 for float64): bit-identical on every run.
void IndexAddRowsCuda(const Tensor& g, const Tensor& index, int64_t outer,
                      int64_t size, int64_t inner, const Tensor& dx);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_SHAPE_OPS_CUDA_H_
