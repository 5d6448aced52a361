// Evaluation during training (train/trainer.h): the mean cross-entropy over
// the scored targets of the evaluation batches and, for the synthetic tasks,
// the accuracy of the answers overall and by distance, summed over the
// ranks. Internal to //train:training.
#ifndef LONGCTX_TRAIN_EVALUATION_H_
#define LONGCTX_TRAIN_EVALUATION_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "distributed/communicator.h"
#include "train/data.h"
#include "train/trainer.h"
#include "train/training_state.h"

namespace lc {
namespace train_internal {

// The number of scored targets (those not -100) of int64 targets on the
// CPU; the training step counts them once to normalize its loss.
int64_t CountScored(const Tensor& targets);

// Evaluates state.model on options.eval_batches batches of `data`'s
// evaluation split, this rank's tokens of each, in eval mode without
// gradients (training mode is restored), and sums the loss, the counts and
// the correct answers over `comm`: every rank returns the same result, at
// state.step.
absl::StatusOr<EvalResult> Evaluate(const TrainOptions& options,
                                    const DataSource& data, RankState& state,
                                    Communicator& comm);

}  // namespace train_internal
}  // namespace lc

#endif  // LONGCTX_TRAIN_EVALUATION_H_
