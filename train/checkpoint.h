// Training checkpoints: one safetensors file per checkpoint,
// <dir>/step_<N>.safetensors, holding the model weights under their own names
// (loadable as-is by Python's safetensors.torch.load_file or
// model.load_state_dict), the optimizer state ("optimizer.*"), generator
// states ("rng.*") and the data position ("data.*"). The "__metadata__"
// strings hold the step, the run's total steps and rank count, the id of the
// run that wrote it, the training configuration and, per tensor,
// "checksum.<name>": TensorChecksum of its bytes as 16 hex digits. Files are
// written atomically (temporary file, fsync, rename), so a crash leaves either
// the old set of checkpoints or the new one.
//
// A run holds its directory through a CheckpointDirectory: an exclusive lock,
// a run id shared by every checkpoint of the run (kept across resumes), and a
// cleanup that deletes only checkpoints of its own run that it has verified.
#ifndef LONGCTX_TRAIN_CHECKPOINT_H_
#define LONGCTX_TRAIN_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace lc {

struct TrainingCheckpoint {
  int64_t step = 0;  // optimizer steps done
  // The run that wrote it (16 hex digits, NewRunId), the total steps of its
  // schedule and the thread ranks it trained on.
  std::string run_id;
  int64_t steps = 0;
  int64_t ranks = 1;
  // The configuration the state belongs to: its description, "key=value"
  // words separated by spaces ("d_model=64 layers=2 ..."), and the
  // description's fingerprint (ConfigFingerprint).
  std::string config;
  std::string fingerprint;
  std::map<std::string, Tensor> tensors;
  std::string path;  // the file it was loaded from (set by LoadCheckpoint)
};

// A short hex digest (64-bit FNV-1a) of a configuration description.
std::string ConfigFingerprint(const std::string& config);

// A 64-bit hash of the tensor's bytes as a safetensors file stores them
// (dense, little-endian), read 8 bytes at a time. Every word goes through a
// step that is a bijection of the word and of the state, so any change
// confined to one aligned 8-byte word - any change of one element - always
// changes the result; other changes go unnoticed with odds of about 2^-64.
uint64_t TensorChecksum(const Tensor& tensor);

// A random 64-bit run id as 16 hex digits.
std::string NewRunId();

// <dir>/step_<step>.safetensors
std::string CheckpointPath(const std::string& dir, int64_t step);

// Reads a checkpoint and verifies it: the metadata is complete, every
// tensor's checksum matches, every floating-point value is finite (training
// never writes others), and it was written for `fingerprint` (`config` is
// this run's description, for the error). Errors: a missing file (NotFound);
// a truncated or corrupt file, one without checksums, a tensor whose checksum
// differs or that holds NaN or infinity (DataLoss naming the file and the
// first bad tensor by name); another configuration (FailedPrecondition naming
// the settings that differ).
absl::StatusOr<TrainingCheckpoint> LoadCheckpoint(
    const std::string& path, const std::string& fingerprint,
    const std::string& config);

// A checkpoint directory held by one run for as long as the object lives:
// the run's exclusive lock on <dir>/.lock, its run id and the checkpoints of
// the run that cleanup may delete.
//
// What Save's cleanup deletes: only checkpoints it has verified to be this
// run's - those written through this object, the one resumed from, and at
// Resume the older checkpoints that load and verify and carry the run's id -
// keeping the newest `keep` of them by step. It never deletes another run's
// file, a file that fails verification (a corrupt newer checkpoint cannot push
// out the verified older one), or a checkpoint newer than the one resumed
// from.
class CheckpointDirectory {
 public:
  // Creates `dir` if needed, checks that it is writable and takes the
  // exclusive lock (flock, not waiting) on <dir>/.lock, then removes the
  // temporary files a killed checkpoint write left (removed_temporaries()).
  // Errors name the directory: it cannot be created or written
  // (PermissionDenied), another run holds it (FailedPrecondition).
  static absl::StatusOr<std::unique_ptr<CheckpointDirectory>> Open(
      const std::string& dir);
  ~CheckpointDirectory();  // removes the lock file and releases the lock
  CheckpointDirectory(const CheckpointDirectory&) = delete;
  CheckpointDirectory& operator=(const CheckpointDirectory&) = delete;

  const std::string& dir() const { return dir_; }
  const std::vector<std::string>& removed_temporaries() const {
    return removed_temporaries_;
  }
  // The run id (empty until StartNewRun or Resume).
  const std::string& run_id() const { return run_id_; }

  // Starts a new run with a new run id. A directory that already holds
  // checkpoints (another run's) is refused with FailedPrecondition naming
  // them and the ways on, unless `overwrite`: then they are deleted and
  // returned.
  absl::StatusOr<std::vector<std::string>> StartNewRun(bool overwrite);

  // Continues the run of checkpoint `path` (empty: the newest in the
  // directory; else it must be one of the directory's step_<N>.safetensors,
  // InvalidArgument otherwise), loaded with LoadCheckpoint, and takes its run
  // id. NotFound when the directory holds no checkpoint. When the checkpoint
  // is corrupt (DataLoss), the one-line error names it and the reason, and
  // the newest older checkpoint that verifies, with the --resume_from flag
  // that continues from it; nothing is deleted.
  absl::StatusOr<TrainingCheckpoint> Resume(const std::string& path,
                                            const std::string& fingerprint,
                                            const std::string& config);

  // Writes `checkpoint` (whose run_id must be run_id()) to
  // CheckpointPath(dir(), checkpoint.step), then cleans up (see above);
  // `keep` >= 1. A tensor holding NaN or infinity is refused
  // (InvalidArgument) and nothing is written.
  absl::Status Save(const TrainingCheckpoint& checkpoint, int keep);

 private:
  CheckpointDirectory(std::string dir, int lock_fd)
      : dir_(std::move(dir)), lock_fd_(lock_fd) {}

  std::string dir_;
  int lock_fd_;
  std::vector<std::string> removed_temporaries_;
  std::string run_id_;
  std::map<int64_t, std::string> own_;  // step -> path, what cleanup may delete
};

}  // namespace lc

#endif  // LONGCTX_TRAIN_CHECKPOINT_H_
