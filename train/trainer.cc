#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/random.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "train/checkpoint.h"
#include "train/evaluation.h"
#include "train/metrics_log.h"
#include "train/training_state.h"

namespace lc {
namespace {

using train_internal::Clock;
using train_internal::CollectState;
using train_internal::CountScored;
using train_internal::Evaluate;
using train_internal::PrepareCheckpoints;
using train_internal::Printable;
using train_internal::RankState;
using train_internal::Reporter;
using train_internal::RestoreState;
using train_internal::Seconds;

constexpr int kKeepCheckpoints = 2;

// The seed of rank `rank`'s dropout generator (distinct per rank, and apart
// from the initialization stream Generator(seed)).
uint64_t DropoutSeed(uint64_t seed, int rank) {
  return (seed ^ 0xD1B54A32D192ED03ull) + 0x9E3779B97F4A7C15ull * (rank + 1);
}

absl::StatusOr<double> AllReduceScalar(Communicator& comm, double value) {
  const Tensor t = FromVector({value}, {1}, DType::kFloat64);
  LC_RETURN_IF_ERROR(comm.AllReduceSum(t));
  return t.at({0});
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
  // Written only when set, so that checkpoints of runs without them still
  // match.
  if (a.window_left != -1) {
    absl::StrAppend(&text, " window_left=", a.window_left);
  }
  if (a.window_right != -1) {
    absl::StrAppend(&text, " window_right=", a.window_right);
  }
  if (a.softcap > 0) absl::StrAppend(&text, " softcap=", a.softcap);
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
  LC_RETURN_IF_ERROR(PrepareCheckpoints(options, run.fingerprint, run.config,
                                        reporter, &directory, &checkpoint));
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
