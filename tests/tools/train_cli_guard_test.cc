// Runs //train as a user would to check that a run cannot silently lose or
// corrupt itself: a diverging learning rate stops it with one line before
// any checkpoint of the diverged state (or, with --skip_nonfinite_steps,
// skips such steps, counted), the metrics stay strict JSON, out-of-range
// numeric flags are refused with one line naming the flag, a metrics file
// that cannot be written stops the run, and a resumed run's metrics hold
// each step once plus a "resume" record.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
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
using testing::JsonObject;
using testing::kPython;
using testing::Number;
using testing::ReadMetrics;
using testing::RunProgram;
using testing::RunTrain;

// Expects every line of the metrics file to parse as strict JSON (Python's
// json refusing NaN, Infinity and -Infinity). RunProgram quotes each
// argument in single quotes, so the program has none.
void ExpectStrictJson(const std::string& path) {
  if (access(kPython, X_OK) != 0) {
    GTEST_SKIP() << kPython << " is absent: cannot check " << path;
  }
  const Result check = RunProgram(
      kPython, {"-c",
                "import json, sys\n"
                "def refuse(token): sys.exit(\"not strict JSON: \" + token)\n"
                "for line in open(sys.argv[1]): json.loads(line, "
                "parse_constant=refuse)\n",
                path});
  EXPECT_EQ(check.exit_code, 0) << path << ": " << check.output;
}

std::string Kind(const JsonObject& record) {
  return record.count("kind") != 0 ? record.at("kind") : "";
}

// --lr=1e10 makes step 1's update throw the weights to ~1e10, so step 2's
// loss is NaN: the run stops there with one line, keeping step 1's
// checkpoint and writing none of step 2.
TEST(TrainCliGuardTest, DivergingRunStopsWithOneLineAndNoCheckpoint) {
  const std::string dir = FreshDir("train_cli_diverge");
  const std::string metrics = dir + "/run.jsonl";
  const Result result =
      RunTrain({"--steps=4", "--lr=1e10", "--checkpoint_every=1",
                "--checkpoint_dir=" + dir + "/ckpt", "--metrics=" + metrics});
  ExpectTrainError(result,
                   {"training diverged at step 2: loss nan",
                    "learning rate 1e+10", "--lr", "--skip_nonfinite_steps=N"},
                   /*alone=*/false);
  EXPECT_TRUE(fs::exists(dir + "/ckpt/step_1.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/ckpt/step_2.safetensors"));
  EXPECT_EQ(ReadMetrics(metrics).size(), 1u);  // step 1's record
  ExpectStrictJson(metrics);
}

TEST(TrainCliGuardTest, SkipsCountedNonFiniteSteps) {
  const std::string dir = FreshDir("train_cli_skip");
  const std::string metrics = dir + "/run.jsonl";
  const Result result =
      RunTrain({"--steps=4", "--lr=1e10", "--skip_nonfinite_steps=3",
                "--metrics=" + metrics});
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, AllOf(HasSubstr("step 2/4 | loss nan"),
                                   HasSubstr("skipped 3 non-finite steps"),
                                   HasSubstr("eval step 4")));
  const std::vector<JsonObject> records = ReadMetrics(metrics);
  ASSERT_EQ(records.size(), 5u);  // train 1-4, eval 4
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(Number(records[i], "skipped_steps"), i);
  }
  EXPECT_EQ(records[3].at("loss"), "null");
  EXPECT_EQ(records[4].at("loss"), "null");  // eval on the diverged weights
  ExpectStrictJson(metrics);

  // One more non-finite step than allowed stops the run.
  ExpectTrainError(
      RunTrain({"--steps=4", "--lr=1e10", "--skip_nonfinite_steps=1"}),
      {"training diverged at step 3",
       "2 such steps in this run, more than skip_nonfinite_steps 1"},
      /*alone=*/false);
}

TEST(TrainCliGuardTest, RefusesNonFiniteAndOutOfRangeNumbers) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--lr=inf", "lr inf (expected a finite number > 0)"},
      {"--lr=nan", "lr nan"},
      {"--lr=-1", "lr -1"},
      {"--min_lr=inf", "min_lr = inf"},
      {"--min_lr=1", "min_lr = 1 (expected 0 <= min_lr <= max_lr"},
      {"--clip=-1", "clip -1 (expected a finite number >= 0"},
      {"--clip=inf", "clip inf"},
      {"--weight_decay=inf", "weight_decay = inf"},
      {"--weight_decay=-0.5", "weight_decay = -0.5"},
      {"--dropout=nan", "dropout nan"},
      {"--attention_dropout=1", "attention dropout 1 (expected in [0, 1))"},
      {"--attention_dropout=nan", "attention dropout nan"},
      {"--threads=100000", "threads 100000 with 1 rank(s)"},
      {"--skip_nonfinite_steps=-1", "skip_nonfinite_steps -1"},
      {"--batch=9223372036854775807", "batch 9223372036854775807 x context"},
      {"--warmup=-1", "warmup -1"},
      {"--log_every=0", "log_every 0"},
      {"--eval_batches=0", "eval_batches 0"},
      {"--queries=1000000000000", "queries 1000000000000 (expected 1..context"},
  };
  for (const auto& [flag, piece] : cases) {
    SCOPED_TRACE(flag);
    ExpectTrainError(RunTrain({"--steps=2", flag}), {piece}, /*alone=*/false);
  }
}

TEST(TrainCliGuardTest, MetricsWriteFailureStopsTheRun) {
  ExpectTrainError(
      RunTrain({"--steps=2", "--metrics=/dev/full"}),
      {"cannot write the metrics file /dev/full", "No space left on device"},
      /*alone=*/false);
}

// Stopped at step 3 with its last checkpoint at step 2 (step 3's removed,
// as if the run was killed before writing it): the resume drops step 3's
// records, appends a resume record, and each step is then there once.
TEST(TrainCliGuardTest, ResumedMetricsHoldEachStepOnce) {
  const std::string dir = FreshDir("train_cli_resume_metrics");
  const std::string metrics = dir + "/run.jsonl";
  const std::string ckpt = "--checkpoint_dir=" + dir + "/ckpt";
  const Result stopped =
      RunTrain({"--steps=4", "--stop_after=3", ckpt, "--metrics=" + metrics});
  ASSERT_EQ(stopped.exit_code, 0) << stopped.output;
  ASSERT_TRUE(fs::remove(dir + "/ckpt/step_3.safetensors"));
  const Result resumed =
      RunTrain({"--steps=4", ckpt, "--metrics=" + metrics, "--resume"});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_THAT(resumed.output,
              HasSubstr("metrics: dropped 2 record(s) of steps after 2"));
  std::vector<std::string> kinds;
  for (const JsonObject& record : ReadMetrics(metrics)) {
    kinds.push_back(absl::StrCat(Kind(record), " ", Number(record, "step")));
  }
  EXPECT_EQ(kinds, (std::vector<std::string>{"\"train\" 1", "\"train\" 2",
                                             "\"resume\" 2", "\"train\" 3",
                                             "\"train\" 4", "\"eval\" 4"}));
  ExpectStrictJson(metrics);
}

}  // namespace
}  // namespace lc
