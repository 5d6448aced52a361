// What a training run saves and restores (train/trainer.h): one rank's
// state, the tensors a checkpoint holds of it and their restoration, and the
// checkpoint directory a run takes before its first step. The file format
// and the directory are train/checkpoint.h's. Internal to //train:training.
#ifndef LONGCTX_TRAIN_TRAINING_STATE_H_
#define LONGCTX_TRAIN_TRAINING_STATE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/tensor.h"
#include "models/transformer_lm.h"
#include "train/checkpoint.h"
#include "train/metrics_log.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace lc {
namespace train_internal {

// One rank's training state.
struct RankState {
  std::shared_ptr<TransformerLM> model;
  std::optional<AdamW> optimizer;
  std::vector<Tensor> params;
  int64_t step = 0;
};

// The state a checkpoint holds, on the CPU (views of the live state when the
// model is there, copies otherwise), without autograd history.
std::map<std::string, Tensor> CollectState(const RankState& state);

// Restores `state` from `checkpoint` (read from `path`): the model's and
// the optimizer's tensors, this thread's dropout generator offset and the
// step. DataLoss naming `path` when a tensor is missing or does not fit, or
// when the step, the data position and the optimizer's step count differ.
absl::Status RestoreState(const TrainingCheckpoint& checkpoint,
                          const std::string& path, RankState& state);

// Takes the checkpoint directory before the first step (so that one that
// cannot be written, or that another run holds, stops the run at once) and,
// when resuming, reads the checkpoint to continue from. Progress lines say
// what was removed and what a resume on another rank count changes.
// `fingerprint` and `config` are the run's (DescribeTrainingConfig).
absl::Status PrepareCheckpoints(const TrainOptions& options,
                                const std::string& fingerprint,
                                const std::string& config, Reporter& reporter,
                                std::unique_ptr<CheckpointDirectory>* directory,
                                std::optional<TrainingCheckpoint>* checkpoint);

}  // namespace train_internal
}  // namespace lc

#endif  // LONGCTX_TRAIN_TRAINING_STATE_H_
