// Checkpoint files: round trip, newest-two retention, a truncated file
// refused with the previous one intact, and another configuration refused.
#include "train/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

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

TrainingCheckpoint MakeCheckpoint(int64_t step, const std::string& config) {
  TrainingCheckpoint c;
  c.step = step;
  c.config = config;
  c.fingerprint = ConfigFingerprint(config);
  c.tensors["blocks.0.attn.q_proj.weight"] =
      FromVector({1.5, -2.0, static_cast<double>(step), 4}, {2, 2});
  c.tensors["optimizer.step"] = FromVector({double(step)}, {}, DType::kInt64);
  return c;
}

TEST(CheckpointTest, RoundTripKeepsTensorsStepAndConfig) {
  const std::string dir = FreshDir("round_trip");
  ASSERT_TRUE(SaveCheckpoint(dir, MakeCheckpoint(12, "d_model=8")).ok());
  absl::StatusOr<std::string> latest = LatestCheckpoint(dir);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(*latest, CheckpointPath(dir, 12));
  EXPECT_THAT(*latest, HasSubstr("step_12.safetensors"));
  absl::StatusOr<TrainingCheckpoint> loaded =
      LoadCheckpoint(*latest, ConfigFingerprint("d_model=8"), "d_model=8");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->step, 12);
  EXPECT_EQ(loaded->config, "d_model=8");
  EXPECT_EQ(loaded->tensors.at("blocks.0.attn.q_proj.weight").ToVector(),
            (std::vector<double>{1.5, -2.0, 12, 4}));
  // The weights are plain safetensors entries under their own names.
  absl::StatusOr<SafetensorsFile> raw = ReadSafetensors(*latest);
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(raw->tensors.count("blocks.0.attn.q_proj.weight"), 1);
  EXPECT_EQ(raw->metadata.at("step"), "12");
}

TEST(CheckpointTest, KeepsTheNewestTwoAndFindsTheLatestByStep) {
  const std::string dir = FreshDir("retention");
  for (int64_t step : {5, 10, 100, 20}) {
    ASSERT_TRUE(SaveCheckpoint(dir, MakeCheckpoint(step, "c")).ok());
  }
  // step 20 was written last but 100 is newer by step: 5 and 10 are gone.
  EXPECT_FALSE(fs::exists(CheckpointPath(dir, 5)));
  EXPECT_FALSE(fs::exists(CheckpointPath(dir, 10)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 20)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 100)));
  EXPECT_EQ(*LatestCheckpoint(dir), CheckpointPath(dir, 100));
}

TEST(CheckpointTest, TruncatedFileIsRefusedAndThePreviousStaysUsable) {
  const std::string dir = FreshDir("truncated");
  ASSERT_TRUE(SaveCheckpoint(dir, MakeCheckpoint(1, "c")).ok());
  ASSERT_TRUE(SaveCheckpoint(dir, MakeCheckpoint(2, "c")).ok());
  const std::string newest = CheckpointPath(dir, 2);
  fs::resize_file(newest, fs::file_size(newest) - 7);  // cut short

  const absl::StatusOr<std::string> latest = LatestCheckpoint(dir);
  ASSERT_TRUE(latest.ok());
  const absl::Status status =
      LoadCheckpoint(*latest, ConfigFingerprint("c"), "c").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(newest), HasSubstr("truncated or corrupt"),
                    HasSubstr(CheckpointPath(dir, 1))));
  // The previous checkpoint is intact and loads.
  absl::StatusOr<TrainingCheckpoint> previous =
      LoadCheckpoint(CheckpointPath(dir, 1), ConfigFingerprint("c"), "c");
  ASSERT_TRUE(previous.ok()) << previous.status();
  EXPECT_EQ(previous->step, 1);
}

TEST(CheckpointTest, AnotherConfigurationIsRefusedNamingBoth) {
  const std::string dir = FreshDir("mismatch");
  ASSERT_TRUE(SaveCheckpoint(dir, MakeCheckpoint(3, "d_model=64")).ok());
  const absl::Status status =
      LoadCheckpoint(CheckpointPath(dir, 3), ConfigFingerprint("d_model=32"),
                     "d_model=32")
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("another configuration"), HasSubstr("d_model=64"),
                    HasSubstr("d_model=32")));
}

TEST(CheckpointTest, MissingDirectoryOrFileIsNotFound) {
  const std::string dir = FreshDir("empty_dir");
  const absl::Status none = LatestCheckpoint(dir).status();
  EXPECT_EQ(none.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.message(), HasSubstr(dir));
  EXPECT_EQ(LoadCheckpoint(CheckpointPath(dir, 1), "x", "x").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lc
