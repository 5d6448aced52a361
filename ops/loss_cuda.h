// CUDA kernels of ops/loss.cc: the cross-entropy forward (one block per row:
// logsumexp in float32, float64 for float64 logits; the mean or the sum over
// the rows in a fixed order) and its backward. Deterministic: no atomics.
#ifndef LONGCTX_OPS_LOSS_CUDA_H_
#define LONGCTX_OPS_LOSS_CUDA_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {
namespace internal {

// For dense floating logits [rows, classes] and dense int64 targets [rows]
// on one CUDA device (each target in [0, classes) or ignore_index):
//   lse[i] = logsumexp_c logits[i, c]   (dense [rows] of ComputeDType),
//   count[0] = the number of rows with targets[i] != ignore_index (int64 [1]),
//   loss[] = sum over those rows of (lse[i] - logits[i, targets[i]]),
//            divided by count when `mean` (0 when count = 0) (a scalar of
//            logits' dtype).
// Runs on the device's current stream.
void CrossEntropyForwardCuda(const Tensor& logits, const Tensor& targets,
                             int64_t ignore_index, bool mean, const Tensor& lse,
                             const Tensor& count, const Tensor& loss);

// The gradient of the loss for the upstream scalar gradient g (logits'
// dtype, on the device) and `mean` as in the forward: dlogits [rows,
// classes] (dense) =
//   s * (exp(logits[i, c] - lse[i]) - [c == targets[i]])
// with s = g / count for the mean (0 when count = 0) and s = g for the sum,
// on rows whose target is not ignore_index, 0 on the others.
void CrossEntropyBackwardCuda(const Tensor& logits, const Tensor& targets,
                              int64_t ignore_index, bool mean,
                              const Tensor& lse, const Tensor& count,
                              const Tensor& g, const Tensor& dlogits);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_LOSS_CUDA_H_
