// The training loop of the long-context language model, context-parallel
// over k thread ranks: every rank builds the model from the same seed (so
// the weights start identical), takes its share of each sequence's tokens
// (SplitSequence, i.e. split before the QKV projection), computes its part of
// the loss (normalized by the all-reduced count of scored targets), and
// backpropagates; the ranks then sum their parameter gradients, clip by the
// global norm and take the same AdamW step, so the weights stay identical.
// The logged loss is the all-reduced sum of the rank losses and equals the
// one-rank loss up to float32 reassociation. Also: evaluation by distance
// (train/evaluation.h), progress lines and JSONL metrics
// (train/metrics_log.h), and checkpoints with exact resume
// (train/training_state.h; the file format is train/checkpoint.h's).
//
// On a CUDA device (model.device) the model, its gradients and the optimizer
// state live there and the optimizer is the fused multi-tensor AdamW; each
// step's batch is made on the CPU and copied over, and besides that copy the
// step waits for the device once, to read the gradient norm (and the loss
// with it).
// model.dtype bfloat16 trains in mixed precision (float32 master weights
// and AdamW state, bfloat16 compute; models/transformer_lm.h).
#ifndef LONGCTX_TRAIN_TRAINER_H_
#define LONGCTX_TRAIN_TRAINER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "models/transformer_lm.h"
#include "train/data.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace lc {

struct StepRecord {
  int64_t step = 0;  // updates done (1 for the first)
  double loss = 0;   // loss of the step's batch, before its update
  double lr = 0;
  double grad_norm = 0;  // before clipping
  // The loss or the gradient norm was not finite: the step made no update
  // (see OptimizerStep) and was counted against skip_nonfinite_steps.
  bool skipped = false;
};

struct TrainOptions {
  // The model; model.attention.ranks is the number of thread ranks (more
  // than one needs a ring attention type), model.context the sequence
  // length, model.device and model.dtype where and in what it computes.
  TransformerConfig model;
  DataOptions data;     // data.context must equal model.context
  int64_t steps = 300;  // optimizer steps of the whole run (the schedule's)
  int64_t batch = 4;    // sequences per step
  double lr = 3e-3;     // peak learning rate
  double min_lr = 3e-4;
  int64_t warmup = 20;
  AdamWOptions adamw;
  double clip = 1.0;  // max global gradient norm; 0: no clipping
  uint64_t seed = 0;  // model initialization and dropout
  // OpenMP threads (Eigen's GEMMs) per rank; 0: the cores divided among the
  // ranks. One is the robust choice on a shared machine: OpenMP threads spin
  // at barriers, and when another process holds a core each parallel region
  // waits for a descheduled thread (measured on the 2-core machine while a
  // compiler ran: 8.0k tokens/s with 2 threads, 27.5k with 1). Above 1,
  // threads x ranks is at most kMaxTrainThreads.
  int threads = 1;

  // A step whose loss or gradient norm is not finite (a diverging run) makes
  // no update. With 0 it stops the run with an error (FailedPrecondition)
  // naming the step; with N > 0 up to N such steps are skipped, counted and
  // reported (progress line, metrics), and the run stops at the (N+1)-th.
  // The count starts afresh when a run is resumed.
  int64_t skip_nonfinite_steps = 0;

  // Checkpoints: every `checkpoint_every` steps (0: only at the end) and at
  // the end, into `checkpoint_dir` (empty: none), keeping the run's newest 2
  // (see CheckpointDirectory). The run holds the directory, created and
  // locked before the first step, until Train returns.
  std::string checkpoint_dir;
  int64_t checkpoint_every = 0;
  // Continue from the newest checkpoint of checkpoint_dir (an error when
  // there is none), or from `resume_from` when set (a checkpoint of
  // checkpoint_dir; implies resume).
  bool resume = false;
  std::string resume_from;
  // A new run in a checkpoint_dir holding checkpoints (of another run) is
  // refused unless this is set: then it deletes them first.
  bool overwrite_checkpoints = false;
  // Stop after this many steps have been done (< steps), as an interrupted
  // run would, writing a checkpoint there; 0: run to `steps`.
  int64_t stop_after = 0;

  // Evaluation every `eval_every` steps (0: only at the end) on
  // `eval_batches` batches of the evaluation split.
  int64_t eval_every = 0;
  int64_t eval_batches = 4;

  // Progress: to `progress` (none when null), every step rewriting one line
  // with '\r' when `progress_in_place` (a terminal), else one line every
  // `log_every` steps. Metrics: one JSON object per line appended to
  // `metrics_path` (empty: none) every `log_every` steps ("kind": "train")
  // and per evaluation ("kind": "eval"); a number that is not finite is
  // written as null (strict JSON has no NaN). A resumed run first drops the
  // records of steps after its checkpoint's (the interrupted run wrote them;
  // the file is rewritten through a temporary file and a rename) and appends
  // {"kind": "resume", "step": S}, so each step appears once. A metrics write
  // that fails stops the run with an error.
  std::ostream* progress = nullptr;
  bool progress_in_place = false;
  int64_t log_every = 10;
  std::string metrics_path;
  // Called on rank 0 after every step with its record and the model (whose
  // weights every rank shares); empty for none.
  std::function<void(const StepRecord&, const TransformerLM&)> on_step;
};

// What one optimizer step returns.
struct StepOutput {
  Tensor loss;  // this rank's loss, a scalar on the model's device
  // The loss read on the host and summed over the ranks of `comm` (the
  // group's loss; this rank's without `comm`).
  double group_loss = 0;
  double grad_norm = 0;  // global, before clipping
  // False when group_loss or grad_norm is not finite: then no weight or
  // AdamW moment changed (only AdamW's step count t moved on, so a skipped
  // step still counts as a step) and the gradients are zeroed. Every rank of
  // `comm` takes the same decision.
  bool applied = true;
};

// One optimizer step of one rank, the step Train runs: the model's loss on
// its tokens and targets (the mean over `scored`, the scored targets of the
// whole group), backward, the gradients summed over `comm` (null: one rank,
// nothing exchanged), clipped to global norm `clip` (0: measured only), an
// AdamW step at learning rate `lr` unless the loss or the norm is not finite
// (StepOutput::applied), the gradients zeroed. params are
// model.Parameters(); sp is the model's sequence-parallel context (null on
// one rank). On CUDA, reading the norm is the step's one wait for the device
// (the loss, computed before it, is read after it).
absl::StatusOr<StepOutput> OptimizerStep(
    TransformerLM& model, AdamW& optimizer, const std::vector<Tensor>& params,
    const Tensor& tokens, const Tensor& targets, int64_t scored, double clip,
    double lr, Communicator* comm, const SequenceParallelContext* sp);

// The most OpenMP threads of a run, over all ranks (TrainOptions::threads
// times the rank count; one thread per rank creates none). libgomp creates a
// team's threads when a parallel region starts and aborts or crashes the
// process when it cannot (--threads=100000 did), and 1024 threads already
// make a tiny step take seconds; threads beyond the cores only wait at
// barriers, so the bound refuses nothing useful on today's machines.
inline constexpr int64_t kMaxTrainThreads = 1024;

// Checks the options (the model config through ValidateTransformerConfig,
// the data options, the schedule, AdamW's options, counts and their
// products, which must fit in int64); errors name the value and what was
// expected.
absl::Status ValidateTrainOptions(const TrainOptions& options);

// The description of everything a checkpoint's state depends on (model,
// attention pattern, task, batch, optimizer and schedule settings, seed; not
// the rank count, the step count or logging), whose fingerprint a checkpoint
// must match to be resumed: "key=value" words separated by spaces, so that a
// mismatch can name the keys that differ.
std::string DescribeTrainingConfig(const TrainOptions& options);

// For synthetic tasks: the position stride and offset on which one head of
// the longest dilated pattern sees every other (see DataOptions): the rate r
// and offset o of the pattern with the largest segment length held by a
// head; (1, 0) for other attention types.
std::pair<int64_t, int64_t> LongestPatternAlignment(
    const TransformerConfig& config);

struct DistanceBucket {
  int64_t min_distance = 0;  // inclusive
  int64_t max_distance = 0;  // inclusive
  int64_t answers = 0;
  double accuracy = 0;
};

struct EvalResult {
  int64_t step = 0;
  // Mean cross-entropy over the scored targets (nats).
  double loss = 0;
  // Synthetic tasks: the fraction of answers whose argmax over all 256
  // bytes is right, overall and by distance; chance = 1 / possible answers.
  int64_t answers = 0;
  double accuracy = 0;
  double chance = 0;
  std::vector<DistanceBucket> buckets;
};

struct TrainResult {
  int64_t first_step = 0;         // steps already done when this run started
  std::vector<StepRecord> steps;  // this run's steps
  std::vector<EvalResult> evals;
  // The final weights and optimizer state (rank 0's; every rank's are
  // identical), as a checkpoint would hold them.
  std::map<std::string, Tensor> final_state;
  double seconds = 0;
  int64_t peak_bytes = 0;  // peak tensor memory of model.device, all ranks
};

// Runs the training (resetting the peak of model.device's memory tracker at
// the start). Checkpoints hold CPU copies of the state, with the same names
// on every device: a run on one device can resume on another.
// Errors: invalid options, a diverging run (FailedPrecondition naming the
// step, its loss, gradient norm and learning rate; see
// skip_nonfinite_steps), a checkpoint that is missing, corrupt or from
// another configuration, a resume with other total steps (the schedule
// depends on them), a checkpoint directory that cannot be written or that
// another run holds, a new run in a directory with checkpoints (unless
// overwrite_checkpoints), files that cannot be written, a rank that fails.
// A resume on another rank count is allowed, with a progress line saying
// that the losses then match the old rank count's only up to float32
// rounding.
absl::StatusOr<TrainResult> Train(const TrainOptions& options);

}  // namespace lc

#endif  // LONGCTX_TRAIN_TRAINER_H_
