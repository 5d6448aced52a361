#include "train/trainer.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/files.h"
#include "core/memory.h"
#include "core/random.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "ops/loss.h"
#include "train/checkpoint.h"

namespace lc {
namespace {

using Clock = std::chrono::steady_clock;

// The dropout generators' offset. Each rank draws from its own generator
// (DropoutSeed), but every rank runs the same model code, so every rank
// advances its generator by the same number of offsets (one per Dropout call)
// each step and all offsets stay equal: rank 0's restores every rank's stream
// (TrainerTest checks a 2-rank resume with dropout bit for bit).
constexpr char kDropoutOffsetKey[] = "rng.dropout.offset";
constexpr char kDataPositionKey[] = "data.position";
constexpr int kMaxBuckets = 4;
constexpr int kKeepCheckpoints = 2;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// The seed of rank `rank`'s dropout generator (distinct per rank, and apart
// from the initialization stream Generator(seed)).
uint64_t DropoutSeed(uint64_t seed, int rank) {
  return (seed ^ 0xD1B54A32D192ED03ull) + 0x9E3779B97F4A7C15ull * (rank + 1);
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::lround(seconds));
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
}

std::string FormatBytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 30)) {
    return absl::StrFormat("%.2f GiB", bytes / double(int64_t{1} << 30));
  }
  return absl::StrFormat("%.0f MiB", bytes / double(1 << 20));
}

std::string FormatRate(double tokens_per_s) {
  if (tokens_per_s >= 1e6) return absl::StrFormat("%.2fM", tokens_per_s / 1e6);
  if (tokens_per_s >= 1e3) return absl::StrFormat("%.1fk", tokens_per_s / 1e3);
  return absl::StrFormat("%.0f", tokens_per_s);
}

// `x` without the sign of a NaN: printf writes "-nan" for one with its sign
// bit set (as inf - inf makes), which reads like a negative value.
double Printable(double x) {
  return std::isnan(x) ? std::numeric_limits<double>::quiet_NaN() : x;
}

// A JSON number, or null for one that is not finite: strict JSON parsers
// refuse NaN and Infinity.
std::string JsonNumber(double x) {
  if (!std::isfinite(x)) return "null";
  return absl::StrFormat("%.9g", x);
}

std::vector<DistanceBucket> MakeBuckets(int64_t min_distance,
                                        int64_t max_distance) {
  std::vector<DistanceBucket> buckets;
  const int64_t span = max_distance - min_distance + 1;
  if (span < 1) return buckets;
  const int64_t count = std::min<int64_t>(kMaxBuckets, span);
  for (int64_t k = 0; k < count; ++k) {
    DistanceBucket bucket;
    bucket.min_distance = min_distance + span * k / count;
    bucket.max_distance = min_distance + span * (k + 1) / count - 1;
    buckets.push_back(bucket);
  }
  return buckets;
}

// Where each global position of the sequence sits among this rank's tokens
// (-1 when another rank holds it).
std::vector<int64_t> LocalIndex(int64_t n, int k, int rank,
                                SequenceLayout layout) {
  std::vector<int64_t> local(n, -1);
  int64_t next = 0;
  for (const PositionSpan& span : RankSpans(n, k, rank, layout)) {
    for (int64_t t = span.begin; t < span.end; ++t) local[t] = next++;
  }
  return local;
}

int64_t CountScored(const Tensor& targets) {
  const Tensor dense = targets.contiguous();
  const int64_t* data = dense.data<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < dense.numel(); ++i) count += data[i] != -100;
  return count;
}

absl::StatusOr<double> AllReduceScalar(Communicator& comm, double value) {
  const Tensor t = FromVector({value}, {1}, DType::kFloat64);
  LC_RETURN_IF_ERROR(comm.AllReduceSum(t));
  return t.at({0});
}

// The step of a metrics record (its "step" member); none when it has none.
std::optional<int64_t> RecordStep(absl::string_view record) {
  constexpr absl::string_view kMember = "\"step\": ";
  const size_t at = record.find(kMember);
  if (at == absl::string_view::npos) return std::nullopt;
  absl::string_view value = record.substr(at + kMember.size());
  value = value.substr(0, value.find_first_of(",}"));
  int64_t step = 0;
  if (!absl::SimpleAtoi(value, &step)) return std::nullopt;
  return step;
}

// Rank 0's output: progress lines and metrics records. A metrics write that
// fails is an error (a full disk must not leave an empty file and exit 0).
class Reporter {
 public:
  Reporter(const TrainOptions& options, int64_t tokens_per_step)
      : options_(options), tokens_per_step_(tokens_per_step) {}

  absl::Status Open() {
    if (options_.metrics_path.empty()) return absl::OkStatus();
    metrics_.open(options_.metrics_path, std::ios::app);
    if (!metrics_) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot open the metrics file ", options_.metrics_path,
                       " for appending"));
    }
    return absl::OkStatus();
  }

  void Line(const std::string& text) {
    if (options_.progress == nullptr) return;
    EndInPlace();
    *options_.progress << text << "\n" << std::flush;
  }

  // Starts the clock; a run resumed at first_step > 0 also drops the metrics
  // of later steps (see TrainOptions::metrics_path) and records the resume.
  absl::Status Start(int64_t first_step, int64_t last_step) {
    start_ = interval_start_ = Clock::now();
    first_step_ = first_step;
    last_step_ = last_step;
    if (first_step == 0 || !metrics_.is_open()) return absl::OkStatus();
    LC_ASSIGN_OR_RETURN(const int64_t dropped, DropRecordsAfter(first_step));
    if (dropped > 0) {
      Line(absl::StrCat("metrics: dropped ", dropped,
                        " record(s) of steps after ", first_step, " from ",
                        options_.metrics_path,
                        " (the interrupted run's; they are redone now)"));
    }
    return Write(absl::StrFormat(
        "{\"kind\": \"resume\", \"step\": %d, \"dropped_records\": %d}",
        first_step, dropped));
  }

  // `skipped`: the steps of this run skipped so far (StepRecord::skipped).
  absl::Status Step(const StepRecord& record, int64_t skipped) {
    if (!record.skipped) {
      interval_loss_ += record.loss;
      ++interval_losses_;
    }
    ++interval_steps_;
    const bool log_due =
        record.step % options_.log_every == 0 || record.step == last_step_;
    const double elapsed = Seconds(start_);
    const double interval = Seconds(interval_start_);
    const double rate =
        interval > 0
            ? tokens_per_step_ * static_cast<double>(interval_steps_) / interval
            : 0;
    const int64_t done = record.step - first_step_;
    const double eta = done > 0 ? elapsed / done * (last_step_ - record.step)
                                : std::numeric_limits<double>::quiet_NaN();
    const int64_t peak = DeviceMemoryStats(options_.model.device).peak_bytes;
    std::string text = absl::StrFormat(
        "step %*d/%d | loss %.4f | lr %.2e | %s tok/s | %s elapsed, ETA %s | "
        "peak %s",
        static_cast<int>(absl::StrCat(options_.steps).size()), record.step,
        options_.steps, Printable(record.loss), record.lr, FormatRate(rate),
        FormatDuration(elapsed), FormatDuration(eta), FormatBytes(peak));
    if (skipped > 0) {
      absl::StrAppend(&text, " | skipped ", skipped, " non-finite step",
                      skipped > 1 ? "s" : "");
    }
    if (options_.progress != nullptr) {
      if (options_.progress_in_place) {
        // Pad so that a shorter line fully covers the previous one.
        *options_.progress << "\r" << text
                           << std::string(std::max<int64_t>(
                                              0, last_width_ - text.size()),
                                          ' ')
                           << std::flush;
        last_width_ = static_cast<int64_t>(text.size());
        in_place_open_ = true;
      } else if (log_due) {
        *options_.progress << text << "\n" << std::flush;
      }
    }
    if (!log_due) return absl::OkStatus();
    // The mean loss of the interval's steps that made an update (null when
    // every one was skipped).
    const double loss = interval_losses_ > 0
                            ? interval_loss_ / interval_losses_
                            : std::numeric_limits<double>::quiet_NaN();
    std::string record_text = absl::StrFormat(
        "{\"kind\": \"train\", \"step\": %d, \"loss\": %s, \"lr\": %s, "
        "\"grad_norm\": %s, \"tokens_per_s\": %s, \"elapsed_s\": %s, "
        "\"peak_bytes\": %d",
        record.step, JsonNumber(loss), JsonNumber(record.lr),
        JsonNumber(record.grad_norm), JsonNumber(rate), JsonNumber(elapsed),
        peak);
    if (options_.skip_nonfinite_steps > 0) {
      absl::StrAppend(&record_text, ", \"skipped_steps\": ", skipped);
    }
    interval_start_ = Clock::now();
    interval_loss_ = 0;
    interval_losses_ = 0;
    interval_steps_ = 0;
    return Write(record_text + "}");
  }

  absl::Status Eval(const EvalResult& eval, bool synthetic) {
    std::string text;
    if (synthetic) {
      std::vector<std::string> buckets;
      for (const DistanceBucket& b : eval.buckets) {
        buckets.push_back(absl::StrFormat("%d-%d: %.1f%%", b.min_distance,
                                          b.max_distance, 100 * b.accuracy));
      }
      text = absl::StrFormat(
          "eval step %d: accuracy %.1f%% (chance %.1f%%) on %d answers, "
          "loss %.4f | by distance %s",
          eval.step, 100 * eval.accuracy, 100 * eval.chance, eval.answers,
          Printable(eval.loss), absl::StrJoin(buckets, ", "));
    } else {
      text = absl::StrFormat(
          "eval step %d: loss %.4f nats/byte (%.3f bits/byte) on evaluation "
          "windows",
          eval.step, Printable(eval.loss),
          Printable(eval.loss) / std::log(2.0));
    }
    Line(text);
    std::vector<std::string> buckets;
    for (const DistanceBucket& b : eval.buckets) {
      buckets.push_back(absl::StrFormat(
          "{\"min\": %d, \"max\": %d, \"answers\": %d, \"accuracy\": %s}",
          b.min_distance, b.max_distance, b.answers, JsonNumber(b.accuracy)));
    }
    return Write(
        absl::StrFormat("{\"kind\": \"eval\", \"step\": %d, \"loss\": %s, "
                        "\"accuracy\": %s, \"chance\": %s, \"answers\": %d, "
                        "\"accuracy_by_distance\": [%s]}",
                        eval.step, JsonNumber(eval.loss),
                        synthetic ? JsonNumber(eval.accuracy) : "null",
                        synthetic ? JsonNumber(eval.chance) : "null",
                        eval.answers, absl::StrJoin(buckets, ", ")));
  }

  void EndInPlace() {
    if (in_place_open_ && options_.progress != nullptr) {
      *options_.progress << "\n";
      in_place_open_ = false;
      last_width_ = 0;
    }
  }

 private:
  // Appends one record (a line) to the metrics file, if there is one.
  absl::Status Write(const std::string& record) {
    if (!metrics_.is_open()) return absl::OkStatus();
    errno = 0;
    metrics_ << record << "\n" << std::flush;
    if (!metrics_) {
      return absl::ErrnoToStatus(errno != 0 ? errno : EIO,
                                 absl::StrCat("cannot write the metrics file ",
                                              options_.metrics_path));
    }
    return absl::OkStatus();
  }

  // Rewrites the metrics file without the records of steps after `step`
  // (and without a torn last line of a killed run) through a temporary file
  // in its directory, synced and renamed, so that a crash leaves the old
  // file or the new one; returns how many records were dropped. A metrics
  // path that is not a regular file (a pipe, /dev/stdout) is left alone.
  absl::StatusOr<int64_t> DropRecordsAfter(int64_t step) {
    const std::string& path = options_.metrics_path;
    struct stat info;
    if (stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) return 0;
    std::string kept;
    int64_t dropped = 0;
    {
      std::ifstream in(path);
      for (std::string line; std::getline(in, line);) {
        if (line.empty()) continue;
        const std::optional<int64_t> line_step = RecordStep(line);
        if ((line_step && *line_step > step) || line.back() != '}') {
          ++dropped;
        } else {
          absl::StrAppend(&kept, line, "\n");
        }
      }
      if (in.bad()) {
        return absl::DataLossError(absl::StrCat("cannot read the metrics file ",
                                                path, " to resume it"));
      }
    }
    if (dropped == 0) return 0;
    metrics_.close();
    LC_RETURN_IF_ERROR(WriteFileAtomically("metrics file", path, {kept}));
    metrics_.open(path, std::ios::app);
    if (!metrics_) {
      return absl::PermissionDeniedError(absl::StrCat(
          "cannot open the metrics file ", path, " for appending"));
    }
    return dropped;
  }

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

// One rank's training state.
struct RankState {
  std::shared_ptr<TransformerLM> model;
  std::optional<AdamW> optimizer;
  std::vector<Tensor> params;
  int64_t step = 0;
};

// The state a checkpoint holds, on the CPU (views of the live state when the
// model is there, copies otherwise), without autograd history.
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

absl::StatusOr<EvalResult> Evaluate(const TrainOptions& options,
                                    const DataSource& data, RankState& state,
                                    Communicator& comm) {
  const int k = comm.size();
  const int rank = comm.rank();
  const int64_t n = options.model.context;
  const SequenceLayout layout = options.model.attention.layout;
  const SequenceParallelContext sp{&comm, n};
  const SequenceParallelContext* sp_ptr = k > 1 ? &sp : nullptr;
  const std::vector<int64_t> local = LocalIndex(n, k, rank, layout);
  const bool synthetic = options.data.task != TaskType::kText;
  std::vector<DistanceBucket> buckets =
      synthetic ? MakeBuckets(options.data.min_distance, data.max_distance())
                : std::vector<DistanceBucket>();
  // [loss sum, scored, answers, correct, per bucket: answers, correct]
  std::vector<double> sums(4 + 2 * buckets.size(), 0.0);

  state.model->Eval();
  NoGradGuard no_grad;
  const absl::Status status = StatusFromCall([&] {
    for (int64_t e = 0; e < options.eval_batches; ++e) {
      const Batch batch = data.MakeBatch(options.batch, e, DataSplit::kEval);
      const Tensor tokens = SplitSequence(batch.tokens, k, rank, layout);
      const Tensor targets = SplitSequence(batch.targets, k, rank, layout);
      Tensor logits = state.model->Forward(tokens, sp_ptr);
      if (logits.dtype() == DType::kBFloat16) {
        logits = logits.to(DType::kFloat32);
      }
      const int64_t rows = logits.size(0) * logits.size(1);
      sums[0] += CrossEntropy(logits.reshape({rows, logits.size(2)}),
                              targets.to(logits.device()).reshape({rows}), -100,
                              LossReduction::kSum)
                     .item();
      sums[1] += CountScored(targets);
      logits = logits.to(Device::Cpu());  // read below element by element
      for (const Answer& answer : batch.answers) {
        const int64_t i = local[answer.position];
        if (i < 0) continue;
        const int64_t target = batch.targets.at({answer.row, answer.position});
        int64_t best = 0;
        double best_logit = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < logits.size(2); ++c) {
          const double value = logits.at({answer.row, i, c});
          if (value > best_logit) {
            best_logit = value;
            best = c;
          }
        }
        const double correct = best == target ? 1 : 0;
        sums[2] += 1;
        sums[3] += correct;
        for (size_t b = 0; b < buckets.size(); ++b) {
          if (answer.distance >= buckets[b].min_distance &&
              answer.distance <= buckets[b].max_distance) {
            sums[4 + 2 * b] += 1;
            sums[5 + 2 * b] += correct;
          }
        }
      }
    }
  });
  state.model->Train();
  LC_RETURN_IF_ERROR(status);
  const Tensor reduced =
      FromVector(sums, {static_cast<int64_t>(sums.size())}, DType::kFloat64);
  LC_RETURN_IF_ERROR(comm.AllReduceSum(reduced));
  const std::vector<double> total = reduced.ToVector();
  EvalResult result;
  result.step = state.step;
  result.loss = total[1] > 0 ? total[0] / total[1] : 0;
  result.answers = static_cast<int64_t>(total[2]);
  result.accuracy = total[2] > 0 ? total[3] / total[2] : 0;
  result.chance = data.chance_accuracy();
  for (size_t b = 0; b < buckets.size(); ++b) {
    buckets[b].answers = static_cast<int64_t>(total[4 + 2 * b]);
    buckets[b].accuracy =
        total[4 + 2 * b] > 0 ? total[5 + 2 * b] / total[4 + 2 * b] : 0;
  }
  result.buckets = std::move(buckets);
  return result;
}

}  // namespace

absl::StatusOr<StepOutput> OptimizerStep(
    TransformerLM& model, AdamW& optimizer, const std::vector<Tensor>& params,
    const Tensor& tokens, const Tensor& targets, int64_t scored, double clip,
    double lr, Communicator* comm, const SequenceParallelContext* sp) {
  StepOutput out;
  LC_RETURN_IF_ERROR(StatusFromCall([&] {
    out.loss = model.Loss(tokens, targets, scored, sp);
    out.loss.backward();
  }));
  if (comm != nullptr) LC_RETURN_IF_ERROR(AllReduceGradients(*comm, params));
  LC_ASSIGN_OR_RETURN(out.grad_norm, ClipGradNorm(params, clip, comm));
  // Reading the norm waited for the device, so reading the loss (computed
  // before it) adds no wait.
  LC_RETURN_IF_ERROR(StatusFromCall([&] { out.group_loss = out.loss.item(); }));
  if (comm != nullptr) {
    LC_ASSIGN_OR_RETURN(out.group_loss, AllReduceScalar(*comm, out.group_loss));
  }
  // Every rank has the same norm (ClipGradNorm checks it) and a sum of the
  // same losses, which is not finite on every rank when it is not on one: the
  // ranks decide alike and their weights stay equal.
  out.applied = std::isfinite(out.group_loss) && std::isfinite(out.grad_norm);
  // Without gradients AdamW changes no weight and no moment; it only counts
  // the step, which keeps its step count equal to the data position.
  if (!out.applied) model.ZeroGrad();
  LC_RETURN_IF_ERROR(StatusFromCall([&] { optimizer.Step(lr); }));
  model.ZeroGrad();
  return out;
}

namespace {

// One optimizer step of one rank; returns its record (the summed loss).
absl::StatusOr<StepRecord> TrainStep(const TrainOptions& options,
                                     const DataSource& data,
                                     const LrSchedule& schedule,
                                     RankState& state, Communicator& comm) {
  const int k = comm.size();
  const int rank = comm.rank();
  const int64_t n = options.model.context;
  const SequenceLayout layout = options.model.attention.layout;
  const SequenceParallelContext sp{&comm, n};
  const SequenceParallelContext* sp_ptr = k > 1 ? &sp : nullptr;

  const Batch batch =
      data.MakeBatch(options.batch, state.step, DataSplit::kTrain);
  Tensor tokens, targets;
  LC_RETURN_IF_ERROR(StatusFromCall([&] {
    tokens = SplitSequence(batch.tokens, k, rank, layout);
    targets = SplitSequence(batch.targets, k, rank, layout);
  }));
  // The step's one count of the scored targets, summed over the ranks: it
  // normalizes every rank's summed loss (Loss does not count them again).
  const Tensor count = FromVector({static_cast<double>(CountScored(targets))},
                                  {1}, DType::kInt64);
  LC_RETURN_IF_ERROR(comm.AllReduceSum(count));
  const int64_t global_count = static_cast<int64_t>(count.item());

  StepRecord record;
  record.lr = LearningRate(schedule, state.step);
  LC_ASSIGN_OR_RETURN(const StepOutput step,
                      OptimizerStep(*state.model, *state.optimizer,
                                    state.params, tokens, targets, global_count,
                                    options.clip, record.lr, &comm, sp_ptr));
  // A skipped step moves the data position on too: retrying its batch on the
  // same weights would give the same non-finite values.
  record.step = ++state.step;
  record.loss = step.group_loss;
  record.grad_norm = step.grad_norm;
  record.skipped = !step.applied;
  return record;
}

// The error that stops a run at a step with a non-finite loss or gradient
// norm; `skipped` such steps so far, this one included.
absl::Status DivergedError(const TrainOptions& options,
                           const StepRecord& record, int64_t skipped) {
  const std::string allowance =
      options.skip_nonfinite_steps == 0
          ? ""
          : absl::StrCat(" (", skipped,
                         " such steps in this run, more than "
                         "skip_nonfinite_steps ",
                         options.skip_nonfinite_steps, ")");
  return absl::FailedPreconditionError(absl::StrFormat(
      "training diverged at step %d: loss %g, gradient norm %g at learning "
      "rate %g%s; the step made no update and no checkpoint holds it. Lower "
      "the learning rate (--lr) or lengthen the warmup (--warmup), or let up "
      "to N such steps be skipped (--skip_nonfinite_steps=N)",
      record.step, Printable(record.loss), Printable(record.grad_norm),
      record.lr, allowance));
}

std::string DescribeAttention(const AttentionConfig& a) {
  // The ring versions compute the same function on any number of ranks.
  const std::string name = AttentionTypeName(a.type);
  std::string text = absl::StrCat(
      "attention=", absl::StripPrefix(name, "ring_"),
      " segments=", absl::StrJoin(a.dilated.segment_lengths, ","),
      " rates=", absl::StrJoin(a.dilated.dilation_rates, ","), " head_layout=",
      a.dilated.head_layout == HeadLayout::kAllHeads ? "all_heads"
                                                     : "head_groups",
      " causal=", a.causal, " attn_dropout=", a.dropout);
  if (a.scale) absl::StrAppend(&text, " scale=", *a.scale);
  if (a.type == AttentionType::kBlockSparse ||
      a.type == AttentionType::kRingBlockSparse) {
    absl::StrAppend(
        &text, " block_size=", a.block_sparse.block_size,
        " sparse_pattern=", static_cast<int>(a.block_sparse.pattern),
        " window=", a.block_sparse.window, " stride=", a.block_sparse.stride,
        " global_tokens=", a.block_sparse.global_tokens,
        " density=", a.block_sparse.density,
        " sparse_seed=", a.block_sparse.seed);
  }
  return text;
}

// What every rank of one Train() call shares. Only rank 0 touches the
// reporter and the result.
struct RunContext {
  const TrainOptions& options;
  const DataSource& data;
  std::string config;
  std::string fingerprint;
  LrSchedule schedule;
  int64_t last_step = 0;
  const TrainingCheckpoint* checkpoint = nullptr;  // resume from it
  CheckpointDirectory* directory = nullptr;        // null: no checkpoints
  Reporter* reporter = nullptr;
  TrainResult* result = nullptr;
};

// One rank's whole run: build, restore, train, evaluate, checkpoint.
absl::Status TrainRank(const RunContext& run, Communicator& comm) {
  const TrainOptions& options = run.options;
  const int ranks = comm.size();
  const bool leader = comm.rank() == 0;
#ifdef _OPENMP
  omp_set_num_threads(options.threads > 0
                          ? options.threads
                          : std::max(1, omp_get_num_procs() / ranks));
#endif
  if (options.model.device.is_cuda()) {
    LC_RETURN_IF_ERROR(
        StatusFromCall([&] { SetCudaDevice(options.model.device.index); }));
  }
  RankState state;
  Generator init(options.seed);
  LC_ASSIGN_OR_RETURN(state.model, TransformerLM::Create(options.model, init));
  state.model->Train();
  state.params = state.model->Parameters();
  LC_ASSIGN_OR_RETURN(
      AdamW optimizer,
      AdamW::Create(state.model->NamedParameters(), options.adamw));
  state.optimizer.emplace(std::move(optimizer));
  DefaultGenerator() = Generator(DropoutSeed(options.seed, comm.rank()));
  if (run.checkpoint != nullptr) {
    LC_RETURN_IF_ERROR(
        RestoreState(*run.checkpoint, run.checkpoint->path, state));
  }

  if (leader) {
    const TransformerConfig& m = options.model;
    int64_t num_params = 0;
    for (const Tensor& p : state.params) num_params += p.numel();
    run.reporter->Line(absl::StrFormat(
        "model: %d parameters (d_model %d, %d layers, %d heads, %s attention, "
        "segments %s, rates %s), context %d, batch %d, %d rank%s, %s %s%s",
        num_params, m.d_model, m.num_layers, m.num_heads,
        AttentionTypeName(m.attention.type),
        absl::StrJoin(m.attention.dilated.segment_lengths, ","),
        absl::StrJoin(m.attention.dilated.dilation_rates, ","), m.context,
        options.batch, ranks, ranks > 1 ? "s" : "", m.device.ToString(),
        DTypeName(m.dtype),
        m.dtype != ParameterDType(m) ? " with float32 master weights" : ""));
    run.reporter->Line(absl::StrCat("data: ", run.data.Describe()));
    if (run.checkpoint != nullptr) {
      run.reporter->Line(absl::StrCat("resumed from ", run.checkpoint->path,
                                      " at step ", state.step));
    }
    run.result->first_step = state.step;
    LC_RETURN_IF_ERROR(run.reporter->Start(state.step, run.last_step));
  }

  auto save = [&]() -> absl::Status {
    if (!leader || run.directory == nullptr) return absl::OkStatus();
    TrainingCheckpoint out;
    out.step = state.step;
    out.run_id = run.directory->run_id();
    out.steps = options.steps;
    out.ranks = ranks;
    out.config = run.config;
    out.fingerprint = run.fingerprint;
    out.tensors = CollectState(state);
    LC_RETURN_IF_ERROR(run.directory->Save(out, kKeepCheckpoints));
    run.reporter->Line(absl::StrCat(
        "checkpoint ", CheckpointPath(options.checkpoint_dir, state.step)));
    return absl::OkStatus();
  };
  auto evaluate = [&]() -> absl::Status {
    LC_ASSIGN_OR_RETURN(EvalResult eval,
                        Evaluate(options, run.data, state, comm));
    if (leader) {
      LC_RETURN_IF_ERROR(
          run.reporter->Eval(eval, options.data.task != TaskType::kText));
      run.result->evals.push_back(std::move(eval));
    }
    return absl::OkStatus();
  };

  int64_t saved_at = run.checkpoint != nullptr ? state.step : -1;
  int64_t skipped = 0;  // steps with a non-finite loss or gradient norm
  while (state.step < run.last_step) {
    LC_ASSIGN_OR_RETURN(
        const StepRecord record,
        TrainStep(options, run.data, run.schedule, state, comm));
    // Every rank sees the same record.skipped, so every rank stops here.
    if (record.skipped && ++skipped > options.skip_nonfinite_steps) {
      return DivergedError(options, record, skipped);
    }
    if (leader) {
      LC_RETURN_IF_ERROR(run.reporter->Step(record, skipped));
      run.result->steps.push_back(record);
      if (options.on_step) options.on_step(record, *state.model);
    }
    if (options.eval_every > 0 && state.step % options.eval_every == 0 &&
        state.step != run.last_step) {
      LC_RETURN_IF_ERROR(evaluate());
    }
    if (options.checkpoint_every > 0 &&
        state.step % options.checkpoint_every == 0) {
      LC_RETURN_IF_ERROR(save());
      saved_at = state.step;
    }
  }
  LC_RETURN_IF_ERROR(evaluate());
  if (saved_at != state.step) LC_RETURN_IF_ERROR(save());
  if (leader) {
    for (auto& [name, tensor] : CollectState(state)) {
      run.result->final_state[name] = tensor.clone();
    }
  }
  return absl::OkStatus();
}

// Takes the checkpoint directory before the first step (so that one that
// cannot be written, or that another run holds, stops the run at once) and,
// when resuming, reads the checkpoint to continue from. Progress lines say
// what was removed and what a resume on another rank count changes.
absl::Status PrepareCheckpoints(const RunContext& run, Reporter& reporter,
                                std::unique_ptr<CheckpointDirectory>* directory,
                                std::optional<TrainingCheckpoint>* checkpoint) {
  const TrainOptions& options = run.options;
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
      (*directory)->Resume(options.resume_from, run.fingerprint, run.config));
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

}  // namespace

std::pair<int64_t, int64_t> LongestPatternAlignment(
    const TransformerConfig& config) {
  const AttentionConfig& a = config.attention;
  if (a.type != AttentionType::kDilated &&
      a.type != AttentionType::kRingDilated) {
    return {1, 0};
  }
  const absl::StatusOr<std::vector<std::vector<DilatedPattern>>> heads =
      DilatedHeadPatterns(a.dilated, config.num_heads);
  if (!heads.ok()) return {1, 0};
  std::optional<DilatedPattern> longest;
  for (const auto& patterns : *heads) {
    for (const DilatedPattern& p : patterns) {
      if (!longest || p.segment_length > longest->segment_length) longest = p;
    }
  }
  if (!longest) return {1, 0};
  return {longest->dilation_rate, longest->offset};
}

absl::Status ValidateTrainOptions(const TrainOptions& options) {
  auto invalid = [](auto&&... pieces) {
    return absl::InvalidArgumentError(absl::StrCat(pieces...));
  };
  LC_RETURN_IF_ERROR(ValidateTransformerConfig(options.model));
  if (options.data.context != options.model.context) {
    return invalid("data context ", options.data.context,
                   " differs from the model context ", options.model.context);
  }
  // The synthetic tasks check the rest of the data options; a query count
  // beyond the context would only ask them to allocate that many answers.
  if (options.data.task != TaskType::kText &&
      options.data.queries > options.data.context) {
    return invalid("queries ", options.data.queries, " (expected 1..context ",
                   options.data.context, ": each answer is a token)");
  }
  if (options.steps < 1)
    return invalid("steps ", options.steps, " (expected >= 1)");
  if (options.batch < 1)
    return invalid("batch ", options.batch, " (expected >= 1)");
  if (options.warmup < 0) {
    return invalid("warmup ", options.warmup, " (expected >= 0 steps)");
  }
  // Checked here too to name the option (the schedule calls it max_lr).
  if (!(options.lr > 0 && std::isfinite(options.lr))) {
    return invalid("lr ", options.lr, " (expected a finite number > 0)");
  }
  LC_RETURN_IF_ERROR(ValidateLrSchedule(
      {options.lr, options.min_lr, options.warmup, options.steps}));
  if (options.stop_after < 0 || options.stop_after > options.steps) {
    return invalid("stop_after ", options.stop_after,
                   " (expected 0..steps = ", options.steps, ")");
  }
  if (options.checkpoint_every < 0) {
    return invalid("checkpoint_every ", options.checkpoint_every,
                   " (expected >= 0; 0 = only at the end)");
  }
  if ((options.resume || !options.resume_from.empty()) &&
      options.checkpoint_dir.empty()) {
    return invalid("resume needs a checkpoint directory (--checkpoint_dir)");
  }
  if (options.overwrite_checkpoints &&
      (options.resume || !options.resume_from.empty())) {
    return invalid(
        "overwrite_checkpoints starts a new run: not with resume or "
        "resume_from");
  }
  if (options.eval_every < 0) {
    return invalid("eval_every ", options.eval_every,
                   " (expected >= 0; 0 = only at the end)");
  }
  if (options.eval_batches < 1) {
    return invalid("eval_batches ", options.eval_batches, " (expected >= 1)");
  }
  if (options.log_every < 1) {
    return invalid("log_every ", options.log_every, " (expected >= 1)");
  }
  const int64_t ranks = options.model.attention.ranks;
  if (options.threads < 0 ||
      (options.threads > 1 && options.threads > kMaxTrainThreads / ranks)) {
    return invalid("threads ", options.threads, " with ", ranks,
                   " rank(s) (expected 1..", kMaxTrainThreads / ranks,
                   " per rank, at most ", kMaxTrainThreads,
                   " in all, or 0 for the cores divided among ranks)");
  }
  if (!(options.clip >= 0 && std::isfinite(options.clip))) {
    return invalid("clip ", options.clip,
                   " (expected a finite number >= 0; 0 = no clipping)");
  }
  if (options.skip_nonfinite_steps < 0) {
    return invalid("skip_nonfinite_steps ", options.skip_nonfinite_steps,
                   " (expected >= 0; 0 = stop at the first non-finite step)");
  }
  LC_RETURN_IF_ERROR(ValidateAdamWOptions(options.adamw));
  // The largest tensor of a step, the float32 logits [batch, context,
  // vocab], must at least have a byte count (a larger one fails to allocate
  // with an error); an overflowing product would wrap around instead.
  int64_t logits_bytes = sizeof(float);
  for (const int64_t factor :
       {options.batch, options.model.context, options.model.vocab_size}) {
    if (__builtin_mul_overflow(logits_bytes, factor, &logits_bytes)) {
      return invalid("batch ", options.batch, " x context ",
                     options.model.context, " x vocab ",
                     options.model.vocab_size,
                     ": a step's float32 logits would exceed 2^63 bytes "
                     "(expected a smaller batch or context)");
    }
  }
  return absl::OkStatus();
}

std::string DescribeTrainingConfig(const TrainOptions& options) {
  const TransformerConfig& m = options.model;
  const DataOptions& d = options.data;
  const AdamWOptions& o = options.adamw;
  std::string task = absl::StrCat("task=", TaskTypeName(d.task));
  if (d.task == TaskType::kText) {
    absl::StrAppend(&task, " data=", d.path);
  } else {
    absl::StrAppend(&task, " distance=", d.min_distance, "..",
                    d.max_distance == 0 ? "max" : absl::StrCat(d.max_distance),
                    " queries=", d.queries, " keys=", d.num_keys,
                    " pairs=", d.pairs, " align=", d.position_offset, "mod",
                    d.position_stride);
  }
  return absl::StrCat(
      "vocab=", m.vocab_size, " context=", m.context, " d_model=", m.d_model,
      " layers=", m.num_layers, " heads=", m.num_heads,
      " mlp_hidden=", m.mlp_hidden, " norm=",
      m.norm == TransformerConfig::Norm::kRMSNorm ? "rmsnorm" : "layernorm",
      " tied=", m.tied_embeddings, " dropout=", m.dropout,
      " rope_base=", m.rope_base, " dtype=", DTypeName(m.dtype), " ",
      DescribeAttention(m.attention), " ", task, " batch=", options.batch,
      " lr=", options.lr, " min_lr=", options.min_lr,
      " warmup=", options.warmup, " betas=", o.beta1, ",", o.beta2,
      " eps=", o.eps, " weight_decay=", o.weight_decay,
      " decay_vectors=", o.decay_vectors, " clip=", options.clip,
      " seed=", options.seed);
}

absl::StatusOr<TrainResult> Train(const TrainOptions& options) {
  LC_RETURN_IF_ERROR(ValidateTrainOptions(options));
  LC_ASSIGN_OR_RETURN(std::unique_ptr<DataSource> data,
                      CreateDataSource(options.data));
  RunContext run{options, *data};
  run.config = DescribeTrainingConfig(options);
  run.fingerprint = ConfigFingerprint(run.config);
  run.schedule = {options.lr, options.min_lr, options.warmup, options.steps};
  run.last_step = options.stop_after > 0 ? options.stop_after : options.steps;

  Reporter reporter(options, options.batch * options.model.context);
  // The directory, held until the run ends, and the checkpoint to resume
  // from, read once here (every rank copies it).
  std::unique_ptr<CheckpointDirectory> directory;
  std::optional<TrainingCheckpoint> checkpoint;
  LC_RETURN_IF_ERROR(
      PrepareCheckpoints(run, reporter, &directory, &checkpoint));
  run.directory = directory.get();
  if (checkpoint) run.checkpoint = &*checkpoint;

  LC_RETURN_IF_ERROR(reporter.Open());
  TrainResult result;
  run.reporter = &reporter;
  run.result = &result;
  DeviceMemoryTracker(options.model.device).Reset();
  const Clock::time_point start = Clock::now();
  const absl::Status status =
      RunRanks(static_cast<int>(options.model.attention.ranks),
               [&run](Communicator& comm) { return TrainRank(run, comm); });
  reporter.EndInPlace();
  LC_RETURN_IF_ERROR(status);
  result.seconds = Seconds(start);
  result.peak_bytes = DeviceMemoryStats(options.model.device).peak_bytes;
  return result;
}

}  // namespace lc
