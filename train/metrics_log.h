// Rank 0's output of a training run (train/trainer.h): the progress lines
// and the JSONL metrics records ("train", "eval", "resume"), whose JSON is
// written by hand, and the resume's rewrite of the metrics file. Internal to
// //train:training.
#ifndef LONGCTX_TRAIN_METRICS_LOG_H_
#define LONGCTX_TRAIN_METRICS_LOG_H_

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "train/trainer.h"

namespace lc {
namespace train_internal {

using Clock = std::chrono::steady_clock;

// Seconds from `since` to now.
double Seconds(Clock::time_point since);

// `x` without the sign of a NaN: printf writes "-nan" for one with its sign
// bit set (as inf - inf makes), which reads like a negative value.
double Printable(double x);

// Rank 0's output: progress lines and metrics records. A metrics write that
// fails is an error (a full disk must not leave an empty file and exit 0).
class Reporter {
 public:
  Reporter(const TrainOptions& options, int64_t tokens_per_step)
      : options_(options), tokens_per_step_(tokens_per_step) {}

  // Opens the metrics file for appending (when there is one).
  absl::Status Open();

  // Writes one progress line (ending an in-place line first).
  void Line(const std::string& text);

  // Starts the clock; a run resumed at first_step > 0 also drops the metrics
  // of later steps (see TrainOptions::metrics_path) and records the resume.
  absl::Status Start(int64_t first_step, int64_t last_step);

  // `skipped`: the steps of this run skipped so far (StepRecord::skipped).
  absl::Status Step(const StepRecord& record, int64_t skipped);

  // The progress line and the metrics record of one evaluation;
  // `synthetic`: a synthetic task (accuracy by distance), else text.
  absl::Status Eval(const EvalResult& eval, bool synthetic);

  // Ends a progress line rewritten in place, if one is open.
  void EndInPlace();

 private:
  // Appends one record (a line) to the metrics file, if there is one.
  absl::Status Write(const std::string& record);

  // Rewrites the metrics file without the records of steps after `step`
  // (and without a torn last line of a killed run) through a temporary file
  // in its directory, synced and renamed, so that a crash leaves the old
  // file or the new one; returns how many records were dropped. A metrics
  // path that is not a regular file (a pipe, /dev/stdout) is left alone.
  absl::StatusOr<int64_t> DropRecordsAfter(int64_t step);

  const TrainOptions& options_;
  int64_t tokens_per_step_;
  std::ofstream metrics_;
  Clock::time_point start_, interval_start_;
  int64_t first_step_ = 0, last_step_ = 0;
  double interval_loss_ = 0;  // over the interval's updates
  int64_t interval_losses_ = 0;
  int64_t interval_steps_ = 0;
  int64_t last_width_ = 0;
  bool in_place_open_ = false;
};

}  // namespace train_internal
}  // namespace lc

#endif  // LONGCTX_TRAIN_METRICS_LOG_H_
