// Checkpoint files: round trip, newest-two retention of the run's own files,
// integrity (checksums of weights and optimizer state, non-finite values, a
// file without checksums), a corrupt newest file reported with the previous
// one that verifies, the directory lock, leftover temporary files, a new run
// refused in a directory of another run's checkpoints, and another
// configuration refused naming the settings that differ.
#include "train/checkpoint.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kConfig[] = "d_model=8 heads=2 lr=0.003";

std::string FreshDir(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/", name);
  fs::remove_all(dir);
  return dir;
}

std::unique_ptr<CheckpointDirectory> MustOpen(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<CheckpointDirectory>> directory =
      CheckpointDirectory::Open(dir);
  EXPECT_TRUE(directory.ok()) << directory.status();
  return directory.ok() ? std::move(*directory) : nullptr;
}

// A new run in a fresh `dir`.
std::unique_ptr<CheckpointDirectory> NewRun(const std::string& dir) {
  std::unique_ptr<CheckpointDirectory> directory = MustOpen(FreshDir(dir));
  if (directory != nullptr) {
    EXPECT_TRUE(directory->StartNewRun(/*overwrite=*/false).ok());
  }
  return directory;
}

TrainingCheckpoint MakeCheckpoint(const CheckpointDirectory& directory,
                                  int64_t step,
                                  const std::string& config = kConfig) {
  TrainingCheckpoint c;
  c.step = step;
  c.run_id = directory.run_id();
  c.steps = 100;
  c.ranks = 2;
  c.config = config;
  c.fingerprint = ConfigFingerprint(config);
  c.tensors["embed.weight"] =
      FromVector({1.5, -2.0, static_cast<double>(step), 4, 0.25, 8}, {3, 2});
  c.tensors["optimizer.m.embed.weight"] =
      FromVector({0.1, 0.2, 0.3, 0.4, 0.5, 0.6}, {3, 2});
  c.tensors["optimizer.step"] = FromVector({double(step)}, {}, DType::kInt64);
  return c;
}

absl::StatusOr<TrainingCheckpoint> Load(const std::string& path) {
  return LoadCheckpoint(path, ConfigFingerprint(kConfig), kConfig);
}

// The position in the file `path` of the first data byte of tensor `name`.
int64_t DataOffset(const std::string& path, const std::string& name) {
  std::ifstream file(path, std::ios::binary);
  uint64_t header_size = 0;
  file.read(reinterpret_cast<char*>(&header_size), 8);
  std::string header(header_size, '\0');
  file.read(header.data(), header_size);
  const size_t entry = header.find(absl::StrCat("\"", name, "\":{"));
  EXPECT_NE(entry, std::string::npos) << name;
  const std::string key = "\"data_offsets\":[";
  const size_t offsets = header.find(key, entry);
  return 8 + header_size + std::stoll(header.substr(offsets + key.size()));
}

void OverwriteBytes(const std::string& path, int64_t offset,
                    const std::string& bytes) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(offset);
  file.write(bytes.data(), bytes.size());
  ASSERT_TRUE(file.good()) << path;
}

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.insert(entry.path().filename().string());
  }
  return names;
}

TEST(CheckpointTest, RoundTripKeepsTensorsMetadataAndChecksums) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("round_trip");
  ASSERT_NE(directory, nullptr);
  EXPECT_EQ(directory->run_id().size(), 16u);
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 12), 2).ok());
  const std::string path = CheckpointPath(directory->dir(), 12);
  EXPECT_THAT(path, HasSubstr("step_12.safetensors"));
  absl::StatusOr<TrainingCheckpoint> loaded = Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->step, 12);
  EXPECT_EQ(loaded->steps, 100);
  EXPECT_EQ(loaded->ranks, 2);
  EXPECT_EQ(loaded->run_id, directory->run_id());
  EXPECT_EQ(loaded->config, kConfig);
  EXPECT_EQ(loaded->path, path);
  EXPECT_EQ(loaded->tensors.at("embed.weight").ToVector(),
            (std::vector<double>{1.5, -2.0, 12, 4, 0.25, 8}));
  // The weights are plain safetensors entries under their own names, each
  // with its checksum in the metadata.
  absl::StatusOr<SafetensorsFile> raw = ReadSafetensors(path);
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(raw->tensors.count("embed.weight"), 1);
  EXPECT_EQ(raw->metadata.at("step"), "12");
  EXPECT_EQ(raw->metadata.at("checksum.embed.weight"),
            absl::StrFormat("%016x",
                            TensorChecksum(raw->tensors.at("embed.weight"))));
  EXPECT_EQ(raw->metadata.count("checksum.optimizer.step"), 1u);
}

TEST(CheckpointTest, ChecksumChangesWithEveryElement) {
  // 9 float32 values: four full 8-byte words and a 4-byte tail.
  const std::vector<double> values = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const uint64_t base = TensorChecksum(FromVector(values, {9}));
  for (size_t i = 0; i < values.size(); ++i) {
    std::vector<double> changed = values;
    changed[i] = -changed[i];
    EXPECT_NE(TensorChecksum(FromVector(changed, {9})), base) << i;
  }
  // The bytes decide, not the shape or the strides.
  EXPECT_EQ(TensorChecksum(FromVector(values, {3, 3})), base);
  const Tensor t = FromVector(values, {3, 3}).transpose(0, 1);
  EXPECT_EQ(TensorChecksum(t), TensorChecksum(t.contiguous()));
  EXPECT_NE(TensorChecksum(FromVector(values, {9}, DType::kFloat64)), base);
}

TEST(CheckpointTest, KeepsTheNewestTwoAndResumesTheLatestByStep) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("retention");
  ASSERT_NE(directory, nullptr);
  const std::string dir = directory->dir();
  for (int64_t step : {5, 10, 100, 20}) {
    ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, step), 2).ok());
  }
  // step 20 was written last but 100 is newer by step: 5 and 10 are gone.
  EXPECT_EQ(Files(dir), (std::set<std::string>{".lock", "step_20.safetensors",
                                               "step_100.safetensors"}));
  directory.reset();
  EXPECT_FALSE(fs::exists(dir + "/.lock"));  // removed with the lock
  directory = MustOpen(dir);
  absl::StatusOr<TrainingCheckpoint> resumed =
      directory->Resume("", ConfigFingerprint(kConfig), kConfig);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->step, 100);
}

// Flips 4 bytes of `tensor`'s data in the newest of two checkpoints and
// expects both the load and the resume to refuse it, naming the file and the
// tensor, the resume naming the previous checkpoint and how to continue.
void ExpectFlipIsCaught(const std::string& tensor) {
  std::unique_ptr<CheckpointDirectory> directory =
      NewRun("flip_" + tensor.substr(0, 9));
  ASSERT_NE(directory, nullptr);
  const std::string dir = directory->dir();
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 1), 2).ok());
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 2), 2).ok());
  directory.reset();
  const std::string newest = CheckpointPath(dir, 2);
  const std::string previous = CheckpointPath(dir, 1);
  OverwriteBytes(newest, DataOffset(newest, tensor) + 4, "\x12\x34\x56\x78");

  const absl::Status status = Load(newest).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(newest), HasSubstr("\"" + tensor + "\""),
                    HasSubstr("checksum")));

  directory = MustOpen(dir);
  const absl::Status resume =
      directory->Resume("", ConfigFingerprint(kConfig), kConfig).status();
  EXPECT_EQ(resume.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(resume.message(),
              AllOf(HasSubstr(newest), HasSubstr("\"" + tensor + "\""),
                    HasSubstr("previous checkpoint " + previous + " verifies"),
                    HasSubstr("--resume_from=" + previous)));
  EXPECT_EQ(resume.message().find('\n'), std::string::npos);
  // Nothing was deleted, and the previous checkpoint resumes.
  EXPECT_TRUE(fs::exists(newest));
  absl::StatusOr<TrainingCheckpoint> resumed =
      directory->Resume(previous, ConfigFingerprint(kConfig), kConfig);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->step, 1);
}

TEST(CheckpointTest, FlippedWeightBytesAreCaught) {
  ExpectFlipIsCaught("embed.weight");
}

TEST(CheckpointTest, FlippedOptimizerBytesAreCaught) {
  ExpectFlipIsCaught("optimizer.m.embed.weight");
}

TEST(CheckpointTest, NonFiniteWeightsAreRefused) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("nan");
  ASSERT_NE(directory, nullptr);
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 3), 2).ok());
  const std::string path = CheckpointPath(directory->dir(), 3);
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok());
  Tensor& embed = file->tensors.at("embed.weight");
  embed.data<float>()[4] = std::numeric_limits<float>::quiet_NaN();

  // Written with the old metadata: the checksum no longer matches.
  ASSERT_TRUE(WriteSafetensors(path, file->tensors, file->metadata).ok());
  absl::Status status = Load(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(path), HasSubstr("\"embed.weight\"")));

  // With a matching checksum the value itself is refused.
  file->metadata["checksum.embed.weight"] =
      absl::StrFormat("%016x", TensorChecksum(embed));
  ASSERT_TRUE(WriteSafetensors(path, file->tensors, file->metadata).ok());
  status = Load(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(path), HasSubstr("\"embed.weight\""),
                    HasSubstr("NaN at element 4")));

  // Saving such a state is refused, and the file on disk stays as it was.
  TrainingCheckpoint bad = MakeCheckpoint(*directory, 4);
  bad.tensors["embed.weight"] = FromVector({1, INFINITY}, {2});
  status = directory->Save(bad, 2);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("\"embed.weight\""), HasSubstr("infinity")));
  EXPECT_FALSE(fs::exists(CheckpointPath(directory->dir(), 4)));
}

TEST(CheckpointTest, FileWithoutChecksumsIsRefused) {
  const std::string dir = FreshDir("no_checksums");
  fs::create_directories(dir);
  const std::string path = CheckpointPath(dir, 7);
  TrainingCheckpoint c = MakeCheckpoint(*NewRun("no_checksums_source"), 7);
  // The metadata a checkpoint had before checksums.
  ASSERT_TRUE(WriteSafetensors(path, c.tensors,
                               {{"step", "7"},
                                {"config", c.config},
                                {"config_fingerprint", c.fingerprint}})
                  .ok());
  const absl::Status status = Load(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(path), HasSubstr("no checksums"),
                    HasSubstr("--overwrite_checkpoints")));
}

TEST(CheckpointTest, TruncatedNewestIsRefusedAndThePreviousStaysUsable) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("truncated");
  ASSERT_NE(directory, nullptr);
  const std::string dir = directory->dir();
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 1), 2).ok());
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 2), 2).ok());
  directory.reset();
  const std::string newest = CheckpointPath(dir, 2);
  fs::resize_file(newest, fs::file_size(newest) - 7);  // cut short

  directory = MustOpen(dir);
  const absl::Status status =
      directory->Resume("", ConfigFingerprint(kConfig), kConfig).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(newest), HasSubstr("truncated or corrupt"),
                    HasSubstr("--resume_from=" + CheckpointPath(dir, 1))));
  EXPECT_TRUE(fs::exists(newest));
  EXPECT_TRUE(Load(CheckpointPath(dir, 1)).ok());
}

TEST(CheckpointTest, NoVerifiedCheckpointSaysHowToStartOver) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("all_bad");
  ASSERT_NE(directory, nullptr);
  const std::string dir = directory->dir();
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 1), 2).ok());
  directory.reset();
  fs::resize_file(CheckpointPath(dir, 1), 100);
  directory = MustOpen(dir);
  const absl::Status status =
      directory->Resume("", ConfigFingerprint(kConfig), kConfig).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), AllOf(HasSubstr("no older checkpoint"),
                                      HasSubstr("--overwrite_checkpoints")));
}

TEST(CheckpointTest, ResumeFromMustBeACheckpointOfTheDirectory) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("resume_from");
  ASSERT_NE(directory, nullptr);
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 1), 2).ok());
  std::unique_ptr<CheckpointDirectory> other = NewRun("resume_from_other");
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(other->Save(MakeCheckpoint(*other, 1), 2).ok());
  const std::string elsewhere = CheckpointPath(other->dir(), 1);
  const absl::Status status =
      directory->Resume(elsewhere, ConfigFingerprint(kConfig), kConfig)
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), AllOf(HasSubstr("--resume_from=" + elsewhere),
                                      HasSubstr(directory->dir()),
                                      HasSubstr("step_1.safetensors")));
}

TEST(CheckpointTest, CleanupDeletesOnlyTheRunsOwnVerifiedFiles) {
  // Another run's checkpoint at step 1, copied in beside this run's 2 and 3.
  std::unique_ptr<CheckpointDirectory> other = NewRun("cleanup_other");
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(other->Save(MakeCheckpoint(*other, 1), 2).ok());
  std::unique_ptr<CheckpointDirectory> directory = NewRun("cleanup");
  ASSERT_NE(directory, nullptr);
  const std::string dir = directory->dir();
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 2), 2).ok());
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 3), 2).ok());
  directory.reset();
  fs::copy_file(CheckpointPath(other->dir(), 1), CheckpointPath(dir, 1));

  // Resumed and saved twice: its own 2 and 3 go, the other run's 1 stays.
  directory = MustOpen(dir);
  absl::StatusOr<TrainingCheckpoint> resumed =
      directory->Resume("", ConfigFingerprint(kConfig), kConfig);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  for (int64_t step : {4, 5}) {
    ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, step), 2).ok());
  }
  EXPECT_EQ(Files(dir), (std::set<std::string>{".lock", "step_1.safetensors",
                                               "step_4.safetensors",
                                               "step_5.safetensors"}));

  // A corrupt newer file (step 7) does not count: resumed from step 5, the
  // run saves step 6 and keeps 5, the only other verified one.
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 7), 2).ok());
  directory.reset();
  const std::string corrupt = CheckpointPath(dir, 7);
  OverwriteBytes(corrupt, DataOffset(corrupt, "embed.weight"), "XXXX");
  directory = MustOpen(dir);
  resumed = directory->Resume(CheckpointPath(dir, 5),
                              ConfigFingerprint(kConfig), kConfig);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 6), 2).ok());
  EXPECT_EQ(Files(dir), (std::set<std::string>{
                            ".lock", "step_1.safetensors", "step_5.safetensors",
                            "step_6.safetensors", "step_7.safetensors"}));
}

TEST(CheckpointTest, ASecondHolderIsRefusedAtOnce) {
  std::unique_ptr<CheckpointDirectory> first = NewRun("locked");
  ASSERT_NE(first, nullptr);
  const absl::Status status = CheckpointDirectory::Open(first->dir()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(first->dir()), HasSubstr("another run")));
  const std::string dir = first->dir();
  first.reset();
  EXPECT_NE(MustOpen(dir), nullptr);
}

TEST(CheckpointTest, OpenRemovesLeftoverTemporaryFiles) {
  const std::string dir = FreshDir("leftovers");
  fs::create_directories(dir);
  const std::string temporary = dir + "/step_4.safetensors.tmp.4242.0";
  std::ofstream(temporary) << "half a checkpoint";
  std::ofstream(dir + "/notes.txt") << "not ours";
  std::unique_ptr<CheckpointDirectory> directory = MustOpen(dir);
  ASSERT_NE(directory, nullptr);
  EXPECT_EQ(directory->removed_temporaries(),
            std::vector<std::string>{temporary});
  EXPECT_EQ(Files(dir), (std::set<std::string>{".lock", "notes.txt"}));
}

TEST(CheckpointTest, UnwritableDirectoryIsRefusedNamingIt) {
  const std::string file = FreshDir("plain_file");
  std::ofstream(file) << "x";
  const absl::Status status =
      CheckpointDirectory::Open(file + "/checkpoints").status();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr(file + "/checkpoints"));
}

TEST(CheckpointTest, NewRunRefusesAnotherRunsCheckpointsUnlessOverwriting) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("new_run");
  ASSERT_NE(directory, nullptr);
  const std::string dir = directory->dir();
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 20), 2).ok());
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 30), 2).ok());
  const std::string first_id = directory->run_id();
  directory.reset();

  directory = MustOpen(dir);
  const absl::Status status = directory->StartNewRun(false).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(dir), HasSubstr("step_20.safetensors"),
                    HasSubstr("step_30.safetensors"), HasSubstr("--resume"),
                    HasSubstr("--overwrite_checkpoints")));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 20)));

  absl::StatusOr<std::vector<std::string>> deleted =
      directory->StartNewRun(true);
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(*deleted, (std::vector<std::string>{CheckpointPath(dir, 20),
                                                CheckpointPath(dir, 30)}));
  EXPECT_EQ(Files(dir), std::set<std::string>{".lock"});
  EXPECT_NE(directory->run_id(), first_id);
}

TEST(CheckpointTest, AnotherConfigurationIsRefusedNamingWhatDiffers) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("mismatch");
  ASSERT_NE(directory, nullptr);
  ASSERT_TRUE(directory->Save(MakeCheckpoint(*directory, 3), 2).ok());
  const std::string other = "d_model=8 heads=4 lr=0.001 data=/a b.txt";
  const absl::Status status =
      LoadCheckpoint(CheckpointPath(directory->dir(), 3),
                     ConfigFingerprint(other), other)
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("another configuration"),
                    HasSubstr("heads: checkpoint 2, this run 4; lr: "
                              "checkpoint 0.003, this run 0.001; data: "
                              "checkpoint (not set), this run /a b.txt"),
                    Not(HasSubstr("d_model"))));
}

TEST(CheckpointTest, MissingDirectoryOrFileIsNotFound) {
  std::unique_ptr<CheckpointDirectory> directory = NewRun("empty_dir");
  ASSERT_NE(directory, nullptr);
  const absl::Status none =
      directory->Resume("", ConfigFingerprint(kConfig), kConfig).status();
  EXPECT_EQ(none.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.message(), HasSubstr(directory->dir()));
  EXPECT_EQ(Load(CheckpointPath(directory->dir(), 1)).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lc
