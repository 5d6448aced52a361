// Runs //train as a user would on its checkpoint directory: a corrupt newest
// checkpoint stops --resume with one line naming the previous one and the
// --resume_from flag that continues from it; a new run refuses another run's
// checkpoints unless --overwrite_checkpoints; a second run at once is refused
// by the directory lock while the first finishes intact; a leftover
// temporary file is removed; other --steps, or a resume without the
// run's window and soft cap, are refused; and an unwritable directory stops
// the run before its first step.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
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
using ::testing::Not;

using Result = testing::ProgramResult;
using testing::ExpectTrainError;
using testing::FreshDir;
using testing::RunTrain;

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.insert(entry.path().filename().string());
  }
  return names;
}

// The metadata entry `key` of a checkpoint file ("" when unreadable).
std::string Metadata(const std::string& path, const std::string& key) {
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok() || file->metadata.count(key) == 0) return "";
  return file->metadata.at(key);
}

TEST(TrainCliCheckpointTest, CorruptNewestNamesThePreviousToResumeFrom) {
  const std::string dir = FreshDir("cli_corrupt");
  const std::string ckpt = "--checkpoint_dir=" + dir;
  const Result stopped = RunTrain({"--steps=6", "--stop_after=4", ckpt});
  ASSERT_EQ(stopped.exit_code, 0) << stopped.output;
  const std::string newest = dir + "/step_4.safetensors";
  const std::string previous = dir + "/step_2.safetensors";
  {  // 4 bytes in the middle of the data: some weight or moment
    std::fstream file(newest, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(fs::file_size(newest) / 2);
    file.write("\x12\x34\x56\x78", 4);
    ASSERT_TRUE(file.good());
  }
  const Result refused = RunTrain({"--steps=6", ckpt, "--resume"});
  ExpectTrainError(refused,
                   {"train: checkpoint " + newest, "is corrupt", "checksum",
                    "previous checkpoint " + previous + " verifies",
                    "--resume_from=" + previous, "Nothing was deleted"});
  EXPECT_EQ(Files(dir), (std::set<std::string>{"step_2.safetensors",
                                               "step_4.safetensors"}));

  const Result resumed =
      RunTrain({"--steps=6", ckpt, "--resume_from=" + previous});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_THAT(resumed.output,
              AllOf(HasSubstr("resumed from " + previous + " at step 2"),
                    HasSubstr("\nstep 3/6 | loss "),
                    HasSubstr("\nstep 6/6 | loss "), HasSubstr("done in")));
  // The corrupt step 4 was rewritten on the way; 4 and 6 are the newest two.
  EXPECT_EQ(Files(dir), (std::set<std::string>{"step_4.safetensors",
                                               "step_6.safetensors"}));
  const Result again = RunTrain({"--steps=6", ckpt, "--resume"});
  EXPECT_EQ(again.exit_code, 0) << again.output;
}

TEST(TrainCliCheckpointTest, NewRunRefusesAnotherRunsCheckpoints) {
  const std::string dir = FreshDir("cli_other_run");
  const std::string ckpt = "--checkpoint_dir=" + dir;
  ASSERT_EQ(RunTrain({"--steps=2", ckpt}).exit_code, 0);
  const std::string path = dir + "/step_2.safetensors";
  const std::string first_run = Metadata(path, "run_id");
  EXPECT_EQ(first_run.size(), 16u);

  ExpectTrainError(RunTrain({"--steps=2", ckpt}),
                   {"train: checkpoint directory " + dir,
                    "holds checkpoints of another run (step_2.safetensors)",
                    "--resume", "--overwrite_checkpoints"});
  EXPECT_EQ(Metadata(path, "run_id"), first_run);

  const Result overwritten =
      RunTrain({"--steps=2", ckpt, "--overwrite_checkpoints"});
  ASSERT_EQ(overwritten.exit_code, 0) << overwritten.output;
  EXPECT_THAT(overwritten.output,
              HasSubstr("--overwrite_checkpoints: deleted 1 checkpoint(s) of "
                        "another run from " +
                        dir + "\n"));
  const std::string second_run = Metadata(path, "run_id");
  EXPECT_EQ(second_run.size(), 16u);
  EXPECT_NE(second_run, first_run);
}

TEST(TrainCliCheckpointTest, ASecondRunAtOnceIsRefusedByTheLock) {
  const std::string dir = FreshDir("cli_concurrent");
  Result first;
  std::thread background([&] {
    first = RunTrain(
        {"--steps=60", "--checkpoint_every=30", "--checkpoint_dir=" + dir});
  });
  // The lock file appears when the first run locks the directory, before
  // it builds the model and trains 60 steps.
  for (int i = 0; i < 6000 && !fs::exists(dir + "/.lock"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const Result second = RunTrain({"--steps=2", "--checkpoint_dir=" + dir});
  background.join();
  ExpectTrainError(second, {"train: checkpoint directory " + dir,
                            "another run holds its lock"});
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_THAT(first.output, HasSubstr("step 60/60"));
  EXPECT_EQ(Files(dir), (std::set<std::string>{"step_30.safetensors",
                                               "step_60.safetensors"}));
  EXPECT_EQ(Metadata(dir + "/step_60.safetensors", "step"), "60");
}

TEST(TrainCliCheckpointTest, LeftoverTemporaryFileIsRemoved) {
  const std::string dir = FreshDir("cli_leftover");
  const std::string temporary = dir + "/step_4.safetensors.tmp.31337.0";
  std::ofstream(temporary) << "the start of a checkpoint";
  const Result result = RunTrain({"--steps=2", "--checkpoint_dir=" + dir});
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output,
              HasSubstr("removed " + temporary +
                        " (left by an interrupted checkpoint write)\n"));
  EXPECT_EQ(Files(dir), std::set<std::string>{"step_2.safetensors"});
}

TEST(TrainCliCheckpointTest, ResumeWithOtherStepsIsRefused) {
  const std::string dir = FreshDir("cli_steps");
  const std::string ckpt = "--checkpoint_dir=" + dir;
  ASSERT_EQ(RunTrain({"--steps=4", "--stop_after=2", ckpt}).exit_code, 0);
  ExpectTrainError(RunTrain({"--steps=6", ckpt, "--resume"}),
                   {"train: --steps=6 differs from the 4 steps",
                    dir + "/step_2.safetensors", "resume with --steps=4"});
}

// --window_left, --window_right and --softcap reach the run's
// configuration: a run with them trains on 2 ranks, and its checkpoint
// resumes with the same values only (the refusal names each one).
TEST(TrainCliCheckpointTest, ResumeWithoutTheWindowOrSoftcapIsRefused) {
  const std::string dir = FreshDir("cli_window");
  const std::string ckpt = "--checkpoint_dir=" + dir;
  const std::vector<std::string> window = {
      "--window_left=16", "--window_right=0", "--softcap=20", "--ranks=2"};
  std::vector<std::string> first = {"--steps=4", "--stop_after=2", ckpt};
  first.insert(first.end(), window.begin(), window.end());
  const Result started = RunTrain(first);
  ASSERT_EQ(started.exit_code, 0) << started.output;
  ExpectTrainError(RunTrain({"--steps=4", ckpt, "--resume", "--ranks=2"}),
                   {"train: ", "another configuration",
                    "window_left: checkpoint 16, this run (not set)",
                    "window_right: checkpoint 0, this run (not set)",
                    "softcap: checkpoint 20, this run (not set)"});
  std::vector<std::string> resumed = {"--steps=4", ckpt, "--resume"};
  resumed.insert(resumed.end(), window.begin(), window.end());
  const Result result = RunTrain(resumed);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, HasSubstr("step 4/4"));
}

TEST(TrainCliCheckpointTest, UnwritableDirectoryFailsBeforeTheFirstStep) {
  const std::string file = FreshDir("cli_unwritable") + "/a_file";
  std::ofstream(file) << "not a directory";
  const std::string dir = file + "/ckpt";
  const Result result = RunTrain({"--steps=2", "--checkpoint_dir=" + dir});
  ExpectTrainError(result, {"train: ", dir});
  EXPECT_THAT(result.output, Not(HasSubstr("step 1/2")));
}

}  // namespace
}  // namespace lc
