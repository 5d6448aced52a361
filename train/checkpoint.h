// Training checkpoints: one safetensors file per checkpoint,
// <dir>/step_<N>.safetensors, holding the model weights under their own names
// (loadable as-is by Python's safetensors.torch.load_file or
// model.load_state_dict), the optimizer state ("optimizer.*"), generator
// states ("rng.*") and the data position ("data.*"), with the step and the
// training configuration in the "__metadata__" strings. Files are written
// atomically (temporary file, fsync, rename), so a crash leaves either the
// old set of checkpoints or the new one; the newest `keep` are kept.
#ifndef LONGCTX_TRAIN_CHECKPOINT_H_
#define LONGCTX_TRAIN_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace lc {

struct TrainingCheckpoint {
  int64_t step = 0;  // optimizer steps done
  // The configuration the state belongs to: a readable description
  // ("d_model=64 layers=2 ...") and its fingerprint (ConfigFingerprint).
  std::string config;
  std::string fingerprint;
  std::map<std::string, Tensor> tensors;
};

// A short hex digest (64-bit FNV-1a) of a configuration description.
std::string ConfigFingerprint(const std::string& config);

// <dir>/step_<step>.safetensors
std::string CheckpointPath(const std::string& dir, int64_t step);

// Writes `checkpoint` to CheckpointPath(dir, checkpoint.step) (creating
// `dir` if needed), then deletes all but the newest `keep` (>= 1)
// step_<N>.safetensors files of `dir`. Metadata: "step", "config",
// "config_fingerprint".
absl::Status SaveCheckpoint(const std::string& dir,
                            const TrainingCheckpoint& checkpoint, int keep = 2);

// The path of the checkpoint with the largest step in `dir`; NotFound naming
// the directory when it holds none (or does not exist).
absl::StatusOr<std::string> LatestCheckpoint(const std::string& dir);

// Reads a checkpoint and checks that it was written for `fingerprint`.
// Errors: a missing file (NotFound); a truncated or corrupt one (DataLoss
// naming the file and the problem, and the older checkpoints of its
// directory, which are intact and can be resumed from once the bad file is
// removed); missing metadata (DataLoss); another configuration
// (FailedPrecondition naming both configurations).
absl::StatusOr<TrainingCheckpoint> LoadCheckpoint(
    const std::string& path, const std::string& fingerprint,
    const std::string& config);

}  // namespace lc

#endif  // LONGCTX_TRAIN_CHECKPOINT_H_
