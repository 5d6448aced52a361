#include "train/training_state.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/random.h"
#include "core/status.h"

namespace lc {
namespace train_internal {
namespace {

// The dropout generators' offset. Each rank draws from its own generator
// (DropoutSeed in train/trainer.cc), but every rank runs the same model code,
// so every rank advances its generator by the same number of offsets (one per
// Dropout call) each step and all offsets stay equal: rank 0's restores every
// rank's stream (TrainerTest checks a 2-rank resume with dropout bit for bit).
constexpr char kDropoutOffsetKey[] = "rng.dropout.offset";
constexpr char kDataPositionKey[] = "data.position";

absl::StatusOr<int64_t> ScalarInt(const std::map<std::string, Tensor>& tensors,
                                  const std::string& key,
                                  const std::string& path) {
  const auto it = tensors.find(key);
  if (it == tensors.end() || it->second.dtype() != DType::kInt64 ||
      it->second.numel() != 1) {
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, " lacks the int64 scalar ", key));
  }
  return static_cast<int64_t>(it->second.item());
}

}  // namespace

std::map<std::string, Tensor> CollectState(const RankState& state) {
  std::map<std::string, Tensor> tensors;
  for (auto& [name, tensor] : state.model->StateDict()) {
    tensors[name] = tensor.detach().to(Device::Cpu());
  }
  for (auto& [name, tensor] : state.optimizer->StateDict()) {
    tensors[name] = tensor.detach().to(Device::Cpu());
  }
  tensors[kDropoutOffsetKey] = FromVector(
      {static_cast<double>(DefaultGenerator().offset())}, {}, DType::kInt64);
  tensors[kDataPositionKey] =
      FromVector({static_cast<double>(state.step)}, {}, DType::kInt64);
  return tensors;
}

absl::Status RestoreState(const TrainingCheckpoint& checkpoint,
                          const std::string& path, RankState& state) {
  std::map<std::string, Tensor> model_tensors;
  for (const auto& [name, tensor] : checkpoint.tensors) {
    if (absl::StartsWith(name, "optimizer.") ||
        absl::StartsWith(name, "rng.") || absl::StartsWith(name, "data.")) {
      continue;
    }
    model_tensors[name] = tensor;
  }
  absl::Status status = state.model->LoadStateDict(model_tensors);
  if (status.ok()) status = state.optimizer->LoadStateDict(checkpoint.tensors);
  if (!status.ok()) {
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, ": ", status.message()));
  }
  LC_ASSIGN_OR_RETURN(const int64_t offset,
                      ScalarInt(checkpoint.tensors, kDropoutOffsetKey, path));
  LC_ASSIGN_OR_RETURN(const int64_t position,
                      ScalarInt(checkpoint.tensors, kDataPositionKey, path));
  if (position != checkpoint.step ||
      state.optimizer->step_count() != checkpoint.step) {
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, " is inconsistent: step ",
                     checkpoint.step, ", data position ", position,
                     ", optimizer step ", state.optimizer->step_count()));
  }
  DefaultGenerator().set_offset(static_cast<uint64_t>(offset));
  state.step = checkpoint.step;
  return absl::OkStatus();
}

absl::Status PrepareCheckpoints(const TrainOptions& options,
                                const std::string& fingerprint,
                                const std::string& config, Reporter& reporter,
                                std::unique_ptr<CheckpointDirectory>* directory,
                                std::optional<TrainingCheckpoint>* checkpoint) {
  if (options.checkpoint_dir.empty()) return absl::OkStatus();
  LC_ASSIGN_OR_RETURN(*directory,
                      CheckpointDirectory::Open(options.checkpoint_dir));
  for (const std::string& path : (*directory)->removed_temporaries()) {
    reporter.Line(absl::StrCat("removed ", path,
                               " (left by an interrupted checkpoint write)"));
  }
  if (!options.resume && options.resume_from.empty()) {
    LC_ASSIGN_OR_RETURN(
        const std::vector<std::string> deleted,
        (*directory)->StartNewRun(options.overwrite_checkpoints));
    if (!deleted.empty()) {
      reporter.Line(absl::StrCat(
          "--overwrite_checkpoints: deleted ", deleted.size(),
          " checkpoint(s) of another run from ", options.checkpoint_dir));
    }
    return absl::OkStatus();
  }
  LC_ASSIGN_OR_RETURN(
      *checkpoint,
      (*directory)->Resume(options.resume_from, fingerprint, config));
  const TrainingCheckpoint& c = **checkpoint;
  if (c.steps != options.steps) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--steps=", options.steps, " differs from the ", c.steps,
        " steps of the run that wrote ", c.path,
        " (they set its learning-rate schedule): resume with --steps=", c.steps,
        ", or start a new run with --overwrite_checkpoints or "
        "another --checkpoint_dir"));
  }
  const int64_t ranks = options.model.attention.ranks;
  if (c.ranks != ranks) {
    // Attention dropout draws one stream on any rank count (the ring takes
    // rank 0's); residual and MLP dropout draw per rank.
    const bool dropout = options.model.dropout > 0;
    auto count = [](int64_t k) {
      return absl::StrCat(k, k == 1 ? " rank" : " ranks");
    };
    reporter.Line(absl::StrCat(
        "note: ", c.path, " was written on ", count(c.ranks),
        " and this run has ", count(ranks), ": the losses match those of ",
        count(c.ranks), " up to float32 rounding, not bit for bit",
        dropout ? "; the dropout masks differ too (each rank draws those of "
                  "its own tokens)"
                : ""));
  }
  return absl::OkStatus();
}

}  // namespace train_internal
}  // namespace lc
