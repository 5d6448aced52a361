// Runs //train as a user would, as a subprocess whose stdout is a pipe: --help
// lists the flags with their defaults; a tiny run prints plain lines (no
// '\r'), appends the JSONL metrics the README documents and writes
// checkpoints; --resume continues it with the losses of an uninterrupted run;
// train/plot_metrics.py turns its metrics into a PNG; bad flags, a stray
// argument and a missing data file each exit 1 with one line naming the
// problem.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tools/run_program.h"
#include "tests/tools/train_cli_util.h"

namespace lc {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

using Result = testing::ProgramResult;
using testing::ExpectTrainError;
using testing::FreshDir;
using testing::Keys;
using testing::kPlot;
using testing::kPython;
using testing::kTiny;
using testing::kTrain;
using testing::Number;
using testing::ParseObject;
using testing::ReadMetrics;
using testing::RunProgram;
using testing::RunTrain;
using testing::TrainLosses;

TEST(TrainCliTest, HelpListsTheFlagsWithDefaults) {
  const Result result = RunProgram(kTrain, {"--help"});
  // absl's --help exits 1 after printing the usage.
  EXPECT_EQ(result.exit_code, 1) << result.output;
  EXPECT_THAT(result.output,
              AllOf(HasSubstr("Trains a long-context byte-level transformer"),
                    HasSubstr("-steps (Optimizer steps of the run.); "
                              "default: 240;"),
                    HasSubstr("-context (Tokens (bytes) per sequence.); "
                              "default: 4096;"),
                    HasSubstr("-ranks"), HasSubstr("-attention"),
                    HasSubstr("default: \"ring_dilated\""), HasSubstr("-task"),
                    HasSubstr("default: \"passkey\""), HasSubstr("-resume"),
                    HasSubstr("-checkpoint_dir"), HasSubstr("-metrics"),
                    HasSubstr("-seed"), HasSubstr("-dropout")));
}

// The tiny run with dropout, stopped after step 2 and resumed, and the same
// run uninterrupted; made once, on first use, for the tests below.
struct TinyRuns {
  std::string dir;      // holds ckpt/, the metrics files and the plot
  std::string metrics;  // of the stopped and the resumed run
  std::string reference_metrics;
  Result stopped, resumed, reference;
};

const TinyRuns& Runs() {
  static const TinyRuns* const runs = [] {
    auto* r = new TinyRuns;
    r->dir = FreshDir("train_cli_run");
    r->metrics = r->dir + "/run.jsonl";
    r->reference_metrics = r->dir + "/reference.jsonl";
    const std::string ckpt = "--checkpoint_dir=" + r->dir + "/ckpt";
    r->stopped = RunTrain({"--steps=4", "--stop_after=2", ckpt,
                           "--metrics=" + r->metrics, "--dropout=0.1"});
    r->resumed = RunTrain({"--steps=4", ckpt, "--metrics=" + r->metrics,
                           "--dropout=0.1", "--resume"});
    r->reference = RunTrain(
        {"--steps=4", "--metrics=" + r->reference_metrics, "--dropout=0.1"});
    return r;
  }();
  return *runs;
}

TEST(TrainCliTest, PrintsPlainLinesWhenNotOnATerminal) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  const std::string& out = runs.stopped.output;
  EXPECT_EQ(out.find('\r'), std::string::npos) << out;
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.back(), '\n');
  EXPECT_THAT(
      out,
      AllOf(HasSubstr("model: "), HasSubstr("data: "),
            HasSubstr("\nstep 1/4 | loss "), HasSubstr("\nstep 2/4 | loss "),
            HasSubstr(" tok/s"), HasSubstr("ETA"), HasSubstr("peak"),
            HasSubstr("\neval step 2: accuracy"), HasSubstr("(chance 12.5%)"),
            HasSubstr("step_2.safetensors"), HasSubstr("done in")));
  EXPECT_THAT(out, ::testing::Not(HasSubstr("step 3/4")));
}

TEST(TrainCliTest, WritesTheDocumentedMetrics) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  const auto records = ReadMetrics(runs.metrics);
  // Appended by both runs: train 1, train 2, eval 2, then the resume's
  // record, train 3, train 4, eval 4.
  ASSERT_EQ(records.size(), 7u);
  const std::set<std::string> train_keys = {
      "kind",      "step",         "loss",      "lr",
      "grad_norm", "tokens_per_s", "elapsed_s", "peak_bytes"};
  const std::set<std::string> eval_keys = {"kind",
                                           "step",
                                           "loss",
                                           "accuracy",
                                           "chance",
                                           "answers",
                                           "accuracy_by_distance"};
  const std::vector<std::pair<std::string, int>> expected = {
      {"train", 1}, {"train", 2}, {"eval", 2}, {"resume", 2},
      {"train", 3}, {"train", 4}, {"eval", 4}};
  for (size_t i = 0; i < records.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("record ", i));
    const auto& r = records[i];
    EXPECT_EQ(r.at("kind"), absl::StrCat("\"", expected[i].first, "\""));
    EXPECT_EQ(Number(r, "step"), expected[i].second);
    if (expected[i].first == "resume") {
      EXPECT_EQ(Keys(r),
                (std::set<std::string>{"kind", "step", "dropped_records"}));
      EXPECT_EQ(Number(r, "dropped_records"), 0);
      continue;
    }
    EXPECT_GT(Number(r, "loss"), 0);
    if (expected[i].first == "train") {
      EXPECT_EQ(Keys(r), train_keys);
      EXPECT_GT(Number(r, "lr"), 0);
      EXPECT_GT(Number(r, "grad_norm"), 0);
      EXPECT_GT(Number(r, "tokens_per_s"), 0);
      EXPECT_GE(Number(r, "elapsed_s"), 0);
      EXPECT_GT(Number(r, "peak_bytes"), 0);
    } else {
      EXPECT_EQ(Keys(r), eval_keys);
      EXPECT_EQ(Number(r, "chance"), 0.125);
      EXPECT_EQ(Number(r, "answers"), 16);  // 1 batch of 2 x 8 queries
      const double accuracy = Number(r, "accuracy");
      EXPECT_TRUE(accuracy >= 0 && accuracy <= 1) << accuracy;
      const std::string& buckets = r.at("accuracy_by_distance");
      ASSERT_TRUE(absl::StartsWith(buckets, "[{") &&
                  absl::EndsWith(buckets, "}]"))
          << buckets;
      // Each bucket is an object of min, max, answers and accuracy.
      for (absl::string_view bucket :
           absl::StrSplit(buckets.substr(1, buckets.size() - 2), "}, {")) {
        std::string object(bucket);
        if (!absl::StartsWith(object, "{")) object = "{" + object;
        if (!absl::EndsWith(object, "}")) object += "}";
        EXPECT_EQ(Keys(ParseObject(object)),
                  (std::set<std::string>{"min", "max", "answers", "accuracy"}))
            << object;
      }
    }
  }
}

TEST(TrainCliTest, WritesCheckpointsWithTheModelsNames) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  // --checkpoint_every=2 over 4 steps: steps 2 and 4, the newest two kept.
  const std::string ckpt = runs.dir + "/ckpt";
  std::set<std::string> files;
  for (const auto& entry : fs::directory_iterator(ckpt)) {
    files.insert(entry.path().filename().string());
  }
  EXPECT_EQ(files, (std::set<std::string>{"step_2.safetensors",
                                          "step_4.safetensors"}));
  absl::StatusOr<SafetensorsFile> file =
      ReadSafetensors(ckpt + "/step_4.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata.at("step"), "4");
  EXPECT_THAT(file->metadata.at("config"),
              AllOf(HasSubstr("context=128"), HasSubstr("d_model=32")));
  for (const char* name : {"embed.weight", "blocks.0.attn.q_proj.weight",
                           "blocks.1.attn.out_proj.weight",
                           "rng.dropout.offset", "data.position"}) {
    EXPECT_EQ(file->tensors.count(name), 1u) << name;
  }
  int optimizer_tensors = 0;
  for (const auto& [name, tensor] : file->tensors) {
    optimizer_tensors += absl::StartsWith(name, "optimizer.");
  }
  EXPECT_GT(optimizer_tensors, 0);
}

TEST(TrainCliTest, ResumeContinuesWithTheLossesOfAnUninterruptedRun) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  ASSERT_EQ(runs.reference.exit_code, 0) << runs.reference.output;
  EXPECT_THAT(
      runs.resumed.output,
      AllOf(HasSubstr("resumed from " + runs.dir +
                      "/ckpt/step_2.safetensors at step 2"),
            HasSubstr("\nstep 3/4 | loss "), HasSubstr("\nstep 4/4 | loss "),
            HasSubstr("eval step 4: accuracy")));
  EXPECT_THAT(runs.resumed.output, ::testing::Not(HasSubstr("step 1/4")));
  // The metrics hold 9 significant digits: with dropout on, the stopped and
  // the resumed run's steps match the uninterrupted run's digit for digit.
  const auto reference = TrainLosses(ReadMetrics(runs.reference_metrics));
  const auto resumed = TrainLosses(ReadMetrics(runs.metrics));
  ASSERT_EQ(reference.size(), 4u);
  EXPECT_EQ(resumed, reference);
}

TEST(TrainCliTest, PlotMetricsWritesAPng) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  if (access(kPython, X_OK) != 0) {
    GTEST_SKIP() << kPython << " (the interpreter of " << kPlot
                 << ") is absent; setup.sh installs python3-matplotlib";
  }
  if (RunProgram(kPython, {"-c", "import matplotlib"}).exit_code != 0) {
    GTEST_SKIP() << "matplotlib is absent for " << kPython
                 << "; setup.sh installs python3-matplotlib";
  }
  const std::string png = runs.dir + "/run.png";
  const Result plot = RunProgram(kPlot, {runs.metrics, png});
  ASSERT_EQ(plot.exit_code, 0) << plot.output;
  EXPECT_THAT(plot.output, HasSubstr("wrote " + png));
  // The PNG signature, then the IHDR chunk: width and height big-endian (a
  // 12 x 4.5 inch figure at 100 dpi).
  std::ifstream file(png, std::ios::binary);
  std::string head(24, '\0');
  file.read(head.data(), 24);
  ASSERT_TRUE(file.good()) << png << " is shorter than a PNG header";
  EXPECT_EQ(head.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(head.substr(12, 4), "IHDR");
  auto big_endian = [&](int at) {
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      value = value << 8 | static_cast<unsigned char>(head[at + i]);
    }
    return value;
  };
  EXPECT_EQ(big_endian(16), 1200u);
  EXPECT_EQ(big_endian(20), 450u);
}

// --attention_dropout trains on several ranks (the ring's ranks draw one
// dropout stream; they used to disagree on its seed and stop).
TEST(TrainCliTest, AttentionDropoutOnTwoRanks) {
  const Result result =
      RunTrain({"--steps=2", "--attention_dropout=0.1", "--ranks=2"});
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, HasSubstr("step 2/2"));
}

TEST(TrainCliTest, BadFlagValue) {
  {  // Not a number: absl's parser says so, in one line of its own.
    const Result result = RunTrain({"--steps=many"});
    EXPECT_EQ(result.exit_code, 1) << result.output;
    EXPECT_EQ(result.output.find('\n'), result.output.size() - 1)
        << result.output;
    EXPECT_THAT(result.output, AllOf(HasSubstr("'many'"), HasSubstr("steps")));
  }
  // A number the trainer refuses.
  ExpectTrainError(RunTrain({"--steps=0"}), {"train: ", "steps 0", ">= 1"});
  ExpectTrainError(RunTrain({"--d_model=30"}), {"train: ", "d_model 30"});
  ExpectTrainError(RunTrain({"--attention=dilated", "--ranks=2"}),
                   {"train: ", "ranks 2", "attention type dilated"});
  ExpectTrainError(RunTrain({"--norm=batchnorm"}),
                   {"train: ", "--norm=batchnorm", "layernorm or rmsnorm"});
  ExpectTrainError(RunTrain({"--window_left=-3"}),
                   {"train: ", "window_left -3", ">= 0, or -1 for unlimited"});
  ExpectTrainError(RunTrain({"--softcap=0"}),
                   {"train: ", "--softcap=0", "finite number > 0"});
}

TEST(TrainCliTest, StrayArgument) {
  ExpectTrainError(RunTrain({"--steps=2", "stray"}),
                   {"train: ", "unexpected argument \"stray\""});
}

TEST(TrainCliTest, MissingDataFile) {
  const std::string missing =
      absl::StrCat(::testing::TempDir(), "/no_such_corpus.txt");
  ExpectTrainError(RunTrain({"--steps=2", "--task=text", "--data=" + missing}),
                   {"train: ", missing});
}

}  // namespace
}  // namespace lc
