#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/safetensors.h"
#include "core/status.h"

namespace lc {
namespace {

namespace fs = std::filesystem;

constexpr char kPrefix[] = "step_";
constexpr char kSuffix[] = ".safetensors";

// (step, path) of every step_<N>.safetensors in `dir`, by step ascending.
std::vector<std::pair<int64_t, std::string>> ListCheckpoints(
    const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code error;
  fs::directory_iterator it(dir, error);
  if (error) return found;
  for (const fs::directory_entry& entry : it) {
    const std::string filename = entry.path().filename().string();
    absl::string_view name = filename;
    if (!absl::ConsumePrefix(&name, kPrefix) ||
        !absl::ConsumeSuffix(&name, kSuffix)) {
      continue;
    }
    int64_t step = 0;
    if (!absl::SimpleAtoi(name, &step) || step < 0) continue;
    found.emplace_back(step, entry.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}

}  // namespace

std::string ConfigFingerprint(const std::string& config) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : config) {
    hash ^= c;
    hash *= 0x100000001b3ull;
  }
  return absl::StrFormat("%016x", hash);
}

std::string CheckpointPath(const std::string& dir, int64_t step) {
  return (fs::path(dir) / absl::StrCat(kPrefix, step, kSuffix)).string();
}

absl::Status SaveCheckpoint(const std::string& dir,
                            const TrainingCheckpoint& checkpoint, int keep) {
  if (keep < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SaveCheckpoint: keep = ", keep, " (expected >= 1)"));
  }
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) {
    return absl::PermissionDeniedError(absl::StrCat(
        "cannot create checkpoint directory ", dir, ": ", error.message()));
  }
  const std::string path = CheckpointPath(dir, checkpoint.step);
  LC_RETURN_IF_ERROR(
      WriteSafetensors(path, checkpoint.tensors,
                       {{"step", absl::StrCat(checkpoint.step)},
                        {"config", checkpoint.config},
                        {"config_fingerprint", checkpoint.fingerprint}}));
  const auto existing = ListCheckpoints(dir);
  for (size_t i = 0; i + keep < existing.size(); ++i) {
    fs::remove(existing[i].second, error);  // best effort
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> LatestCheckpoint(const std::string& dir) {
  const auto existing = ListCheckpoints(dir);
  if (existing.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no checkpoint (step_<N>.safetensors) in directory ", dir));
  }
  return existing.back().second;
}

absl::StatusOr<TrainingCheckpoint> LoadCheckpoint(
    const std::string& path, const std::string& fingerprint,
    const std::string& config) {
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  if (!file.ok()) {
    if (file.status().code() != absl::StatusCode::kDataLoss) {
      return file.status();
    }
    std::vector<std::string> older;
    for (const auto& [step, other] :
         ListCheckpoints(fs::path(path).parent_path().string())) {
      if (other != path) older.push_back(other);
    }
    return absl::DataLossError(absl::StrCat(
        "checkpoint ", path, " is truncated or corrupt and was not loaded: ",
        file.status().message(),
        older.empty()
            ? ""
            : absl::StrCat(
                  "; other checkpoints in its directory: ",
                  absl::StrJoin(older, ", "),
                  " (remove the bad file to resume from the newest)")));
  }
  TrainingCheckpoint checkpoint;
  const auto& metadata = file->metadata;
  const auto step = metadata.find("step");
  const auto written_fingerprint = metadata.find("config_fingerprint");
  if (step == metadata.end() || written_fingerprint == metadata.end() ||
      !absl::SimpleAtoi(step->second, &checkpoint.step)) {
    return absl::DataLossError(absl::StrCat(
        "checkpoint ", path,
        " lacks the metadata \"step\" and \"config_fingerprint\" (not a "
        "training checkpoint?)"));
  }
  checkpoint.fingerprint = written_fingerprint->second;
  const auto written_config = metadata.find("config");
  if (written_config != metadata.end())
    checkpoint.config = written_config->second;
  if (checkpoint.fingerprint != fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " belongs to another configuration (fingerprint ",
        checkpoint.fingerprint, ": ", checkpoint.config,
        ") than this run (fingerprint ", fingerprint, ": ", config,
        "); use the flags it was written with or another --checkpoint_dir"));
  }
  checkpoint.tensors = std::move(file->tensors);
  return checkpoint;
}

}  // namespace lc
