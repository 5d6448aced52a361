// Training losses: cross-entropy of logits against integer class targets,
// with a fused log-softmax forward and backward.
#ifndef LONGCTX_OPS_LOSS_H_
#define LONGCTX_OPS_LOSS_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {

// How CrossEntropy reduces its per-row losses over the rows it scores (those
// whose target is not ignore_index), as torch's reduction='mean' / 'sum'.
enum class LossReduction {
  // The mean over the scored rows: the sum divided by their count.
  kMean,
  // Their sum, without the division: for a loss normalized by a count known
  // elsewhere (the scored targets of all ranks of a context-parallel group,
  // see TransformerLM::Loss), so that nothing is counted twice.
  kSum,
};

// Cross-entropy of logits [N, C] against targets (int64 [N]), reduced by
// `reduction` over the rows i with targets[i] != ignore_index of
//   logsumexp_c(logits[i, c]) - logits[i, targets[i]].
// Every other target must lie in [0, C). Returns a scalar (shape {}).
// logits may be on the CPU or CUDA; targets on the CPU or on logits' device
// (on CUDA the range check waits for the device). CUDA computes in float32
// (float64 for float64 logits) and sums the rows in a fixed order: equal
// inputs give bit-identical losses and gradients, with either reduction.
// When every target is ignored both reductions return 0 with a zero
// gradient (torch's mean returns NaN there), so a batch of padding does not
// poison training.
Tensor CrossEntropy(const Tensor& logits, const Tensor& targets,
                    int64_t ignore_index = -100,
                    LossReduction reduction = LossReduction::kMean);

}  // namespace lc

#endif  // LONGCTX_OPS_LOSS_H_
