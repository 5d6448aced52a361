// The training loop: exact resume on 1 and 2 ranks, K ranks against one
// (and the dropout masks they do not share), learning on the passkey task,
// progress and metrics output, and bad input.
#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "train/checkpoint.h"

namespace lc {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

std::string FreshDir(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/", name);
  fs::remove_all(dir);
  return dir;
}

// A CI-sized run: 2 layers of width 32 over 128 tokens, passkey retrieval
// aligned to the long dilated pattern (segments 32 and 128, rates 1 and 4).
TrainOptions TinyOptions(int64_t ranks = 1) {
  TrainOptions o;
  TransformerConfig& m = o.model;
  m.context = 128;
  m.d_model = 32;
  m.num_layers = 2;
  m.num_heads = 2;
  m.attention.type = AttentionType::kRingDilated;
  m.attention.dilated.segment_lengths = {32, 128};
  m.attention.dilated.dilation_rates = {1, 4};
  m.attention.causal = true;
  m.attention.ranks = ranks;
  o.data.context = m.context;
  o.data.queries = 8;
  o.data.num_keys = 8;
  std::tie(o.data.position_stride, o.data.position_offset) =
      LongestPatternAlignment(m);
  o.steps = 6;
  o.batch = 2;
  o.warmup = 2;
  o.eval_batches = 1;
  o.seed = 3;
  return o;
}

using Weights = std::map<std::string, std::vector<double>>;

Weights Snapshot(const TransformerLM& model) {
  Weights weights;
  for (const auto& [name, tensor] : model.StateDict()) {
    weights[name] = tensor.ToVector();
  }
  return weights;
}

TEST(TrainerTest, AlignmentFollowsTheLongestPattern) {
  const TrainOptions o = TinyOptions();
  // Head 1 has (128, 4, 1 mod 4 = 1).
  EXPECT_EQ(o.data.position_stride, 4);
  EXPECT_EQ(o.data.position_offset, 1);
}

// Stops a run with dropout on `ranks` thread ranks after step 3, resumes it
// from the checkpoint and expects the losses, gradient norms and weights of
// every later step, and the final optimizer and generator state, to be
// bit-identical to those of an uninterrupted run.
void ExpectResumeIsBitIdentical(int64_t ranks) {
  TrainOptions base = TinyOptions(ranks);
  base.model.dropout = 0.1;  // every rank's dropout generator must resume too
  base.steps = 8;

  std::map<int64_t, Weights> reference_weights;
  TrainOptions uninterrupted = base;
  uninterrupted.on_step = [&](const StepRecord& r, const TransformerLM& m) {
    reference_weights[r.step] = Snapshot(m);
  };
  absl::StatusOr<TrainResult> reference = Train(uninterrupted);
  ASSERT_TRUE(reference.ok()) << reference.status();
  ASSERT_EQ(reference->steps.size(), 8u);

  const std::string dir = FreshDir(absl::StrCat("resume_", ranks));
  TrainOptions first = base;
  first.checkpoint_dir = dir;
  first.stop_after = 3;
  absl::StatusOr<TrainResult> stopped = Train(first);
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  ASSERT_EQ(stopped->steps.size(), 3u);
  ASSERT_TRUE(fs::exists(CheckpointPath(dir, 3)));

  std::map<int64_t, Weights> resumed_weights;
  TrainOptions second = base;
  second.checkpoint_dir = dir;
  second.resume = true;
  second.on_step = [&](const StepRecord& r, const TransformerLM& m) {
    resumed_weights[r.step] = Snapshot(m);
  };
  absl::StatusOr<TrainResult> resumed = Train(second);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->first_step, 3);
  ASSERT_EQ(resumed->steps.size(), 5u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(stopped->steps[i].loss, reference->steps[i].loss) << i;
  }
  for (int i = 0; i < 5; ++i) {
    const StepRecord& a = reference->steps[3 + i];
    const StepRecord& b = resumed->steps[i];
    EXPECT_EQ(b.step, a.step);
    EXPECT_EQ(b.loss, a.loss) << "step " << a.step;  // bit-identical
    EXPECT_EQ(b.grad_norm, a.grad_norm) << "step " << a.step;
    EXPECT_EQ(b.lr, a.lr);
    EXPECT_TRUE(resumed_weights.at(a.step) == reference_weights.at(a.step))
        << "weights differ after step " << a.step;
  }
  // Optimizer state, generator and data position agree at the end too.
  ASSERT_EQ(resumed->final_state.size(), reference->final_state.size());
  for (const auto& [name, tensor] : reference->final_state) {
    EXPECT_EQ(resumed->final_state.at(name).ToVector(), tensor.ToVector())
        << name;
  }
  // The run ended with a checkpoint at step 8; the newest two are kept.
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 8)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 3)));
}

TEST(TrainerTest, ResumeIsBitIdenticalToAnUninterruptedRun) {
  ExpectResumeIsBitIdentical(1);
}

// Each rank draws its dropout masks from its own generator; the checkpoint
// must bring every rank's stream back to where it stopped.
TEST(TrainerTest, ResumeOnTwoRanksIsBitIdenticalToAnUninterruptedRun) {
  ExpectResumeIsBitIdentical(2);
}

// The largest |x| of a tensor's values (0 for an empty one).
double MaxAbs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::abs(v));
  return m;
}

// Without dropout, K ranks compute the function of one rank; only float32
// sums run in another order: the all-reduce adds the ranks' gradients, the
// ring merges partial attention outputs in another order, the loss is a sum
// of rank losses. Measured over 3 steps of the tiny model (k = 2, 4,
// contiguous and zigzag): losses agree to 5e-8 relative and gradient norms
// to 2e-7. AdamW amplifies those differences in the weights: its first steps
// move every weight by about lr * m / sqrt(v), where v is still tiny, so an
// element whose gradient is close to eps (1e-8) or changes sign moves by a
// different fraction of lr = 3e-3: weights differ by up to 1.4e-5, and the
// moments m and v, fed by the gradients at those weights, by up to 8e-6 of
// their tensor's largest value. The tolerances leave a margin of 7-20x.
TEST(TrainerTest, TwoAndFourRanksGiveTheLossesOfOne) {
  TrainOptions one = TinyOptions(1);
  one.steps = 3;
  TrainOptions two = TinyOptions(2);
  two.steps = 3;
  TrainOptions zigzag = TinyOptions(2);
  zigzag.steps = 3;
  zigzag.model.attention.layout = SequenceLayout::kZigzag;
  TrainOptions four = TinyOptions(4);
  four.steps = 3;
  absl::StatusOr<TrainResult> a = Train(one);
  ASSERT_TRUE(a.ok()) << a.status();
  for (const TrainOptions& options : {two, zigzag, four}) {
    SCOPED_TRACE(
        absl::StrCat(options.model.attention.ranks, " ranks, ",
                     SequenceLayoutName(options.model.attention.layout)));
    absl::StatusOr<TrainResult> b = Train(options);
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ(b->steps.size(), 3u);
    for (int i = 0; i < 3; ++i) {
      EXPECT_NEAR(b->steps[i].loss, a->steps[i].loss,
                  1e-6 * std::abs(a->steps[i].loss))
          << "step " << i + 1;
      EXPECT_NEAR(b->steps[i].grad_norm, a->steps[i].grad_norm,
                  2e-6 * a->steps[i].grad_norm)
          << "step " << i + 1;
    }
    ASSERT_EQ(b->final_state.size(), a->final_state.size());
    for (const auto& [name, tensor] : a->final_state) {
      const std::vector<double> x = tensor.ToVector();
      const std::vector<double> y = b->final_state.at(name).ToVector();
      ASSERT_EQ(y.size(), x.size()) << name;
      // Moments: relative to the tensor's scale (v is a squared gradient,
      // far below 1); weights: absolute, as the AdamW steps are.
      const double tolerance =
          absl::StartsWith(name, "optimizer.") ? 1e-4 * MaxAbs(x) : 1e-4;
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_NEAR(y[i], x[i], tolerance) << name << "[" << i << "]";
      }
    }
  }
}

// With dropout, K ranks do not reproduce one rank: each rank draws the masks
// of its own tokens from its own generator, indexed by position in its
// shard, so the model sees other masks (equally distributed) and the loss of
// the very first step already differs by far more than float32 rounding.
TEST(TrainerTest, DropoutOnSeveralRanksDrawsOtherMasksThanOneRank) {
  TrainOptions one = TinyOptions(1);
  one.steps = 1;
  one.model.dropout = 0.1;
  TrainOptions two = one;
  two.model.attention.ranks = 2;
  absl::StatusOr<TrainResult> a = Train(one);
  absl::StatusOr<TrainResult> b = Train(two);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_GT(std::abs(b->steps[0].loss - a->steps[0].loss),
            1e-4 * std::abs(a->steps[0].loss));
}

// A real assertion that the model learns: 150 seeded steps of passkey
// retrieval over 256 tokens (8 keys, chance 12.5%, i.e. a loss of ln 8 = 2.1
// for a model that knows the keys but cannot find them; segments 64 and 256
// with rates 1 and 8) bring the answer loss from about ln 256 = 5.5 below 0.3
// (it reaches ~0.17) and the accuracy at every distance above 90% (100%), in
// about 2 s on one core.
TEST(TrainerTest, LearnsPasskeyRetrieval) {
  TrainOptions o = TinyOptions();
  o.model.context = o.data.context = 256;
  o.model.attention.dilated.segment_lengths = {64, 256};
  o.model.attention.dilated.dilation_rates = {1, 8};
  std::tie(o.data.position_stride, o.data.position_offset) =
      LongestPatternAlignment(o.model);
  o.data.queries = 16;
  o.steps = 150;
  o.batch = 4;
  o.warmup = 10;
  o.lr = 1e-2;
  o.min_lr = 1e-3;
  o.eval_batches = 8;
  absl::StatusOr<TrainResult> result = Train(o);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->steps.size(), 150u);
  EXPECT_GT(result->steps.front().loss, 5.0);
  double last = 0;
  for (int i = 140; i < 150; ++i) last += result->steps[i].loss / 10;
  EXPECT_LT(last, 0.3);
  ASSERT_EQ(result->evals.size(), 1u);
  const EvalResult& eval = result->evals.back();
  EXPECT_EQ(eval.chance, 1.0 / 8);
  EXPECT_GT(eval.accuracy, 0.9);
  EXPECT_LT(eval.loss, 0.3);
  ASSERT_EQ(eval.buckets.size(), 4u);
  EXPECT_EQ(eval.buckets.back().max_distance, 248);
  for (const DistanceBucket& bucket : eval.buckets) {
    EXPECT_GT(bucket.answers, 50);
    EXPECT_GT(bucket.accuracy, 0.9)
        << bucket.min_distance << "-" << bucket.max_distance;
  }
}

TEST(TrainerTest, ProgressAndMetricsOutput) {
  TrainOptions o = TinyOptions();
  o.steps = 4;
  o.log_every = 2;
  o.eval_every = 2;
  std::ostringstream lines;
  o.progress = &lines;
  o.metrics_path = absl::StrCat(::testing::TempDir(), "/metrics.jsonl");
  fs::remove(o.metrics_path);
  ASSERT_TRUE(Train(o).ok());
  EXPECT_THAT(
      lines.str(),
      AllOf(HasSubstr("step 2/4 | loss "), HasSubstr("tok/s"), HasSubstr("ETA"),
            HasSubstr("peak"), HasSubstr("eval step 4: accuracy"),
            HasSubstr("chance 12.5%")));
  EXPECT_EQ(lines.str().find('\r'), std::string::npos);

  std::ifstream file(o.metrics_path);
  std::vector<std::string> records;
  for (std::string line; std::getline(file, line);) records.push_back(line);
  ASSERT_EQ(records.size(), 4u);  // train 2, eval 2, train 4, eval 4
  EXPECT_THAT(records[0],
              AllOf(HasSubstr("\"kind\": \"train\""), HasSubstr("\"step\": 2"),
                    HasSubstr("\"lr\""), HasSubstr("\"grad_norm\""),
                    HasSubstr("\"tokens_per_s\"")));
  EXPECT_THAT(records[3],
              AllOf(HasSubstr("\"kind\": \"eval\""), HasSubstr("\"step\": 4"),
                    HasSubstr("\"accuracy_by_distance\": [{")));

  // On a terminal: one line rewritten with '\r'.
  std::ostringstream terminal;
  o.progress = &terminal;
  o.progress_in_place = true;
  o.metrics_path.clear();
  ASSERT_TRUE(Train(o).ok());
  EXPECT_THAT(terminal.str(), HasSubstr("\rstep 1/4 | loss"));
  EXPECT_THAT(terminal.str(), HasSubstr("\rstep 4/4 | loss"));
}

TEST(TrainerTest, BadInputGivesClearErrors) {
  TrainOptions o = TinyOptions();
  o.model.d_model = 30;
  absl::Status status = Train(o).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("d_model 30"));

  o = TinyOptions();
  o.data.task = TaskType::kText;
  o.data.path = absl::StrCat(::testing::TempDir(), "/missing.txt");
  status = Train(o).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr("missing.txt"));

  o.data.path = absl::StrCat(::testing::TempDir(), "/empty.txt");
  std::ofstream(o.data.path).close();
  EXPECT_THAT(Train(o).status().message(), HasSubstr("is empty"));

  o = TinyOptions();
  o.model.attention.type = AttentionType::kDilated;
  o.model.attention.ranks = 2;
  status = Train(o).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("ranks 2"), HasSubstr("attention type dilated"),
                    HasSubstr("ring_dilated")));

  // Resume: no checkpoint; another configuration; a truncated newest file.
  o = TinyOptions();
  o.steps = 2;
  o.checkpoint_dir = FreshDir("bad_resume");
  o.resume = true;
  status = Train(o).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr("bad_resume"));
  o.resume = false;
  o.checkpoint_every = 1;
  ASSERT_TRUE(Train(o).ok());  // checkpoints at steps 1 and 2
  TrainOptions other = o;
  other.resume = true;
  other.model.d_model = 16;
  status = Train(other).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("another configuration"), HasSubstr("d_model=16"),
                    HasSubstr("d_model=32")));
  const std::string newest = CheckpointPath(o.checkpoint_dir, 2);
  fs::resize_file(newest, fs::file_size(newest) / 2);
  o.resume = true;
  o.steps = 3;
  status = Train(o).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(
      status.message(),
      AllOf(HasSubstr(newest), HasSubstr(CheckpointPath(o.checkpoint_dir, 1))));
  EXPECT_TRUE(fs::exists(CheckpointPath(o.checkpoint_dir, 1)));
}

}  // namespace
}  // namespace lc
