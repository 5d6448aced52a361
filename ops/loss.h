// Training losses: cross-entropy of logits against integer class targets,
// with a fused log-softmax forward and backward.
#ifndef LONGCTX_OPS_LOSS_H_
#define LONGCTX_OPS_LOSS_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {

// Mean cross-entropy of logits [N, C] against targets (int64 [N]): the mean
// over rows i with targets[i] != ignore_index of
//   logsumexp_c(logits[i, c]) - logits[i, targets[i]].
// Every other target must lie in [0, C). Returns a scalar (shape {}).
// logits may be on the CPU or CUDA; targets on the CPU or on logits' device
// (on CUDA the range check waits for the device). CUDA computes in float32
// (float64 for float64 logits) and sums the rows in a fixed order: equal
// inputs give bit-identical losses and gradients.
// Unlike torch, which returns NaN when every target is ignored, that case
// returns 0 with a zero gradient, so a batch of padding does not poison
// training.
Tensor CrossEntropy(const Tensor& logits, const Tensor& targets,
                    int64_t ignore_index = -100);

}  // namespace lc

#endif  // LONGCTX_OPS_LOSS_H_
