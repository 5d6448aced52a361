#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/autograd.h"
#include "core/safetensors.h"
#include "core/status.h"

namespace lc {
namespace {

namespace fs = std::filesystem;

// The checksum reads tensor memory as the file's little-endian words.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "checkpoint checksums assume a little-endian host");

constexpr char kPrefix[] = "step_";
constexpr char kSuffix[] = ".safetensors";
// WriteSafetensors writes <path>.tmp.<pid>.<counter> and renames it.
constexpr char kTemporaryInfix[] = ".safetensors.tmp.";
constexpr char kLockName[] = ".lock";
constexpr char kChecksumPrefix[] = "checksum.";
// Metadata keys besides the checksums.
constexpr char kStepKey[] = "step";
constexpr char kStepsKey[] = "steps";
constexpr char kRanksKey[] = "ranks";
constexpr char kRunIdKey[] = "run_id";
constexpr char kConfigKey[] = "config";
constexpr char kFingerprintKey[] = "config_fingerprint";

// What a user can do with a directory whose checkpoints cannot be resumed.
constexpr char kStartOver[] =
    "start a new run with --overwrite_checkpoints (deleting them) or another "
    "--checkpoint_dir";

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
    found.emplace_back(step, CheckpointPath(dir, step));
  }
  std::sort(found.begin(), found.end());
  return found;
}

// The file names of `paths`, for a one-line message: all of them, or the
// first two and the last when there are more than three.
std::string FileNames(const std::vector<std::string>& paths) {
  std::vector<std::string> names;
  for (const std::string& path : paths) {
    names.push_back(fs::path(path).filename().string());
  }
  if (names.size() > 3) {
    return absl::StrCat(names[0], ", ", names[1], ", ... (", names.size() - 3,
                        " more), ", names.back());
  }
  return absl::StrJoin(names, ", ");
}

// xxHash64's primes; the structure below is its round and avalanche.
constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kPrime3 = 0x165667B19E3779F9ull;

uint64_t RotateLeft(uint64_t x, int bits) {
  return (x << bits) | (x >> (64 - bits));
}

// Multiplying by an odd constant, adding and rotating are bijections, so the
// round is one of `word` for a fixed `state` and of `state` for a fixed
// `word`: a changed word always changes the state.
uint64_t Round(uint64_t state, uint64_t word) {
  return RotateLeft(state + word * kPrime2, 31) * kPrime1;
}

uint64_t HashBytes(const unsigned char* data, int64_t size) {
  // Word i goes to lane i % 4: four independent multiply chains keep the
  // CPU's multipliers busy (about 4x the throughput of one chain).
  uint64_t lanes[4] = {kPrime1, kPrime2, kPrime3, kPrime1 ^ kPrime3};
  const int64_t words = size / 8;
  int64_t i = 0;
  for (; i + 4 <= words; i += 4) {
    uint64_t w[4];
    std::memcpy(w, data + 8 * i, 32);
    for (int lane = 0; lane < 4; ++lane) {
      lanes[lane] = Round(lanes[lane], w[lane]);
    }
  }
  for (; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, data + 8 * i, 8);
    lanes[i % 4] = Round(lanes[i % 4], w);
  }
  if (size % 8 != 0) {  // the last bytes, zero-padded to a word
    uint64_t w = 0;
    std::memcpy(&w, data + 8 * words, size % 8);
    lanes[words % 4] = Round(lanes[words % 4], w);
  }
  uint64_t hash = static_cast<uint64_t>(size);
  for (const uint64_t lane : lanes) hash = Round(hash, lane);
  hash ^= hash >> 33;
  hash *= kPrime2;
  hash ^= hash >> 29;
  hash *= kPrime3;
  return hash ^ (hash >> 32);
}

std::string Hex(uint64_t value) { return absl::StrFormat("%016x", value); }

// A dense CPU copy of `tensor` (itself when it already is one).
Tensor Dense(const Tensor& tensor) {
  NoGradGuard no_grad;
  return tensor.to(Device::Cpu()).contiguous();
}

uint64_t DenseChecksum(const Tensor& dense) {
  return HashBytes(static_cast<const unsigned char*>(dense.raw_data()),
                   dense.numel() * DTypeSize(dense.dtype()));
}

// The first NaN or infinity of a dense floating-point tensor, described
// ("NaN at element 3"); empty when every value is finite or the tensor holds
// integers.
std::string FirstNonFinite(const Tensor& dense) {
  const int64_t n = dense.numel();
  auto describe = [](double value, int64_t i) {
    return absl::StrCat(std::isnan(value) ? "NaN" : "an infinity",
                        " at element ", i);
  };
  switch (dense.dtype()) {
    case DType::kFloat32: {
      const float* data = dense.data<float>();
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(data[i])) return describe(data[i], i);
      }
      return "";
    }
    case DType::kFloat64: {
      const double* data = dense.data<double>();
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(data[i])) return describe(data[i], i);
      }
      return "";
    }
    case DType::kBFloat16: {
      // All exponent bits set: an infinity (zero mantissa) or NaN.
      const auto* bits = static_cast<const uint16_t*>(dense.raw_data());
      for (int64_t i = 0; i < n; ++i) {
        if ((bits[i] & 0x7F80) == 0x7F80) {
          return describe((bits[i] & 0x7F) != 0 ? NAN : INFINITY, i);
        }
      }
      return "";
    }
    default:
      return "";
  }
}

// A "key=value key=value" description as (key, value) pairs in order; a word
// without '=' continues the previous value (a data path with spaces).
std::vector<std::pair<std::string, std::string>> ConfigEntries(
    const std::string& config) {
  std::vector<std::pair<std::string, std::string>> entries;
  for (absl::string_view word : absl::StrSplit(config, ' ')) {
    const size_t eq = word.find('=');
    if (eq == absl::string_view::npos && !entries.empty()) {
      absl::StrAppend(&entries.back().second, " ", word);
    } else if (eq != absl::string_view::npos) {
      entries.emplace_back(std::string(word.substr(0, eq)),
                           std::string(word.substr(eq + 1)));
    }
  }
  return entries;
}

// The settings that differ between the checkpoint's description and this
// run's: "lr: checkpoint 0.003, this run 0.001; heads: ...".
std::string ConfigDifference(const std::string& written,
                             const std::string& current) {
  const auto old_entries = ConfigEntries(written);
  const auto new_entries = ConfigEntries(current);
  const std::map<std::string, std::string> old_values(old_entries.begin(),
                                                      old_entries.end());
  const std::map<std::string, std::string> new_values(new_entries.begin(),
                                                      new_entries.end());
  std::vector<std::string> differences;
  auto value_in = [](const std::map<std::string, std::string>& values,
                     const std::string& key) {
    const auto it = values.find(key);
    return it == values.end() ? std::string("(not set)") : it->second;
  };
  auto compare = [&](const std::string& key) {
    const std::string a = value_in(old_values, key);
    const std::string b = value_in(new_values, key);
    if (a != b) {
      differences.push_back(
          absl::StrCat(key, ": checkpoint ", a, ", this run ", b));
    }
  };
  for (const auto& [key, value] : new_entries) compare(key);
  for (const auto& [key, value] : old_entries) {
    if (new_values.count(key) == 0) compare(key);
  }
  return absl::StrJoin(differences, "; ");
}

// Checks every tensor of `file` against its "checksum.<name>" metadata and
// for finite values; DataLoss (without the path) naming the first bad tensor.
absl::Status VerifyTensors(const SafetensorsFile& file) {
  for (const auto& [key, value] : file.metadata) {
    if (!absl::StartsWith(key, kChecksumPrefix)) continue;
    const std::string name(absl::StripPrefix(key, kChecksumPrefix));
    if (file.tensors.count(name) == 0) {
      return absl::DataLossError(absl::StrCat(
          "tensor \"", name, "\" is listed in its checksums but missing"));
    }
  }
  for (const auto& [name, tensor] : file.tensors) {
    const auto stored = file.metadata.find(kChecksumPrefix + name);
    if (stored == file.metadata.end()) {
      return absl::DataLossError(
          absl::StrCat("tensor \"", name, "\" has no checksum"));
    }
    const std::string computed = Hex(DenseChecksum(tensor));
    if (computed != stored->second) {
      return absl::DataLossError(absl::StrCat(
          "tensor \"", name, "\" has checksum ", computed, ", but ",
          stored->second, " was stored with it: its bytes changed"));
    }
    const std::string bad = FirstNonFinite(tensor);
    if (!bad.empty()) {
      return absl::DataLossError(
          absl::StrCat("tensor \"", name, "\" holds ", bad,
                       " (training never writes non-finite values)"));
    }
  }
  return absl::OkStatus();
}

// Takes the exclusive lock on `path` without waiting; returns its
// descriptor.
absl::StatusOr<int> Lock(const std::string& dir, const std::string& path) {
  while (true) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::PermissionDeniedError(absl::StrCat(
          "checkpoint directory ", dir, " is not writable: ", "cannot create ",
          path, ": ", std::strerror(errno)));
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      close(fd);
      if (error == EWOULDBLOCK) {
        return absl::FailedPreconditionError(absl::StrCat(
            "checkpoint directory ", dir, " is in use: another run holds its ",
            "lock ", path, "; wait for that run to end or use another ",
            "--checkpoint_dir"));
      }
      return absl::ErrnoToStatus(
          error, absl::StrCat("cannot lock checkpoint directory ", dir, " (",
                              path, ")"));
    }
    // The previous holder removes the file before it lets go; when that
    // happened after our open(), we hold an unlinked file: open the new one.
    struct stat held, current;
    if (fstat(fd, &held) == 0 && stat(path.c_str(), &current) == 0 &&
        held.st_dev == current.st_dev && held.st_ino == current.st_ino) {
      return fd;
    }
    close(fd);
  }
}

}  // namespace

std::string ConfigFingerprint(const std::string& config) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : config) {
    hash ^= c;
    hash *= 0x100000001b3ull;
  }
  return Hex(hash);
}

uint64_t TensorChecksum(const Tensor& tensor) {
  return DenseChecksum(Dense(tensor));
}

std::string NewRunId() {
  std::random_device device;
  return Hex(static_cast<uint64_t>(device()) << 32 | device());
}

std::string CheckpointPath(const std::string& dir, int64_t step) {
  return (fs::path(dir) / absl::StrCat(kPrefix, step, kSuffix)).string();
}

absl::StatusOr<TrainingCheckpoint> LoadCheckpoint(
    const std::string& path, const std::string& fingerprint,
    const std::string& config) {
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  if (!file.ok()) {
    if (file.status().code() != absl::StatusCode::kDataLoss) {
      return file.status();
    }
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path,
                     " is truncated or corrupt: ", file.status().message()));
  }
  if (std::none_of(file->metadata.begin(), file->metadata.end(),
                   [](const auto& entry) {
                     return absl::StartsWith(entry.first, kChecksumPrefix);
                   })) {
    return absl::DataLossError(absl::StrCat(
        "checkpoint ", path,
        " has no checksums (it was written before checkpoints carried them), "
        "so its contents cannot be verified; ",
        kStartOver));
  }
  const absl::Status verified = VerifyTensors(*file);
  if (!verified.ok()) {
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, " is corrupt: ", verified.message()));
  }
  TrainingCheckpoint checkpoint;
  checkpoint.path = path;
  const auto& metadata = file->metadata;
  auto text = [&metadata](const char* key, std::string* out) {
    const auto it = metadata.find(key);
    if (it == metadata.end()) return false;
    *out = it->second;
    return true;
  };
  auto number = [&metadata](const char* key, int64_t* out) {
    const auto it = metadata.find(key);
    return it != metadata.end() && absl::SimpleAtoi(it->second, out);
  };
  if (!number(kStepKey, &checkpoint.step) ||
      !number(kStepsKey, &checkpoint.steps) ||
      !number(kRanksKey, &checkpoint.ranks) ||
      !text(kRunIdKey, &checkpoint.run_id) ||
      !text(kConfigKey, &checkpoint.config) ||
      !text(kFingerprintKey, &checkpoint.fingerprint)) {
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, " lacks some of the metadata ",
                     absl::StrJoin({kStepKey, kStepsKey, kRanksKey, kRunIdKey,
                                    kConfigKey, kFingerprintKey},
                                   ", "),
                     " (not a training checkpoint?)"));
  }
  if (checkpoint.fingerprint != fingerprint) {
    std::string difference = ConfigDifference(checkpoint.config, config);
    if (difference.empty()) {
      difference = absl::StrCat("fingerprint ", checkpoint.fingerprint,
                                ", this run's ", fingerprint);
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " belongs to another configuration: ", difference,
        "; use the settings it was written with, or ", kStartOver));
  }
  checkpoint.tensors = std::move(file->tensors);
  return checkpoint;
}

absl::StatusOr<std::unique_ptr<CheckpointDirectory>> CheckpointDirectory::Open(
    const std::string& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) {
    return absl::PermissionDeniedError(absl::StrCat(
        "cannot create checkpoint directory ", dir, ": ", error.message()));
  }
  // Opening an existing lock file needs no write permission on the
  // directory, but writing checkpoints does.
  if (access(dir.c_str(), W_OK | X_OK) != 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("checkpoint directory ", dir,
                     " is not writable: ", std::strerror(errno)));
  }
  const std::string lock_path = (fs::path(dir) / kLockName).string();
  LC_ASSIGN_OR_RETURN(const int fd, Lock(dir, lock_path));
  std::unique_ptr<CheckpointDirectory> directory(
      new CheckpointDirectory(dir, fd));
  // Holding the lock, no write of another run is under way: a temporary file
  // is what a killed write left.
  fs::directory_iterator it(dir, error);
  for (; !error && it != fs::directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (absl::StartsWith(name, kPrefix) &&
        absl::StrContains(name, kTemporaryInfix)) {
      directory->removed_temporaries_.push_back(it->path().string());
    }
  }
  for (const std::string& path : directory->removed_temporaries_) {
    if (!fs::remove(path, error) && error) {
      return absl::PermissionDeniedError(absl::StrCat(
          "cannot remove ", path,
          " (left by an interrupted checkpoint write): ", error.message()));
    }
  }
  return directory;
}

CheckpointDirectory::~CheckpointDirectory() {
  // Removed while still locked, so that no other run locks this file after
  // we let go (Lock checks that it holds the file the name refers to).
  unlink((fs::path(dir_) / kLockName).c_str());
  close(lock_fd_);
}

absl::StatusOr<std::vector<std::string>> CheckpointDirectory::StartNewRun(
    bool overwrite) {
  std::vector<std::string> existing;
  for (const auto& [step, path] : ListCheckpoints(dir_)) {
    existing.push_back(path);
  }
  if (!existing.empty() && !overwrite) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint directory ", dir_, " holds checkpoints of another run (",
        FileNames(existing),
        "): add --resume to continue that run, --overwrite_checkpoints to "
        "delete them and start this one, or use another --checkpoint_dir"));
  }
  for (const std::string& path : existing) {
    std::error_code error;
    if (!fs::remove(path, error) && error) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot delete ", path,
                       " (--overwrite_checkpoints): ", error.message()));
    }
  }
  run_id_ = NewRunId();
  own_.clear();
  return existing;
}

absl::StatusOr<TrainingCheckpoint> CheckpointDirectory::Resume(
    const std::string& path, const std::string& fingerprint,
    const std::string& config) {
  const auto existing = ListCheckpoints(dir_);
  if (existing.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no checkpoint (step_<N>.safetensors) in directory ", dir_));
  }
  auto target = existing.end() - 1;
  if (!path.empty()) {
    std::error_code error;
    target =
        std::find_if(existing.begin(), existing.end(), [&](const auto& entry) {
          return fs::equivalent(path, entry.second, error);
        });
    if (target == existing.end()) {
      std::vector<std::string> paths;
      for (const auto& entry : existing) paths.push_back(entry.second);
      return absl::InvalidArgumentError(absl::StrCat(
          "--resume_from=", path, " is not a checkpoint of --checkpoint_dir=",
          dir_, " (expected one of its files ", FileNames(paths), ")"));
    }
  }
  absl::StatusOr<TrainingCheckpoint> loaded =
      LoadCheckpoint(target->second, fingerprint, config);
  if (!loaded.ok() && loaded.status().code() == absl::StatusCode::kDataLoss) {
    // Name the newest older checkpoint that verifies; delete nothing.
    for (auto older = std::make_reverse_iterator(target);
         older != existing.rend(); ++older) {
      if (LoadCheckpoint(older->second, fingerprint, config).ok()) {
        return absl::DataLossError(absl::StrCat(
            loaded.status().message(), ". Nothing was deleted; the previous ",
            "checkpoint ", older->second, " verifies: continue from it with ",
            "--resume_from=", older->second));
      }
    }
    return absl::DataLossError(absl::StrCat(
        loaded.status().message(), ". Nothing was deleted; no older ",
        "checkpoint in ", dir_, " verifies: ", kStartOver));
  }
  LC_RETURN_IF_ERROR(loaded.status());
  run_id_ = loaded->run_id;
  own_.clear();
  own_[target->first] = target->second;
  for (auto older = existing.begin(); older != target; ++older) {
    absl::StatusOr<TrainingCheckpoint> other =
        LoadCheckpoint(older->second, fingerprint, config);
    if (other.ok() && other->run_id == run_id_) {
      own_[older->first] = older->second;
    }
  }
  return loaded;
}

absl::Status CheckpointDirectory::Save(const TrainingCheckpoint& checkpoint,
                                       int keep) {
  LC_CHECK(!run_id_.empty() && checkpoint.run_id == run_id_)
      << "checkpoint of run " << checkpoint.run_id << " saved into run "
      << run_id_;
  if (keep < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CheckpointDirectory::Save: keep = ", keep, " (expected >= 1)"));
  }
  const std::string path = CheckpointPath(dir_, checkpoint.step);
  std::map<std::string, std::string> metadata = {
      {kStepKey, absl::StrCat(checkpoint.step)},
      {kStepsKey, absl::StrCat(checkpoint.steps)},
      {kRanksKey, absl::StrCat(checkpoint.ranks)},
      {kRunIdKey, checkpoint.run_id},
      {kConfigKey, checkpoint.config},
      {kFingerprintKey, checkpoint.fingerprint}};
  for (const auto& [name, tensor] : checkpoint.tensors) {
    Tensor dense;
    LC_RETURN_IF_ERROR(StatusFromCall([&] { dense = Dense(tensor); }));
    const std::string bad = FirstNonFinite(dense);
    if (!bad.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("not writing checkpoint ",
                                                     path, ": tensor \"", name,
                                                     "\" holds ", bad));
    }
    metadata[kChecksumPrefix + name] = Hex(DenseChecksum(dense));
  }
  LC_RETURN_IF_ERROR(WriteSafetensors(path, checkpoint.tensors, metadata));
  own_[checkpoint.step] = path;
  while (static_cast<int>(own_.size()) > keep) {
    std::error_code error;
    fs::remove(own_.begin()->second, error);  // best effort
    own_.erase(own_.begin());
  }
  return absl::OkStatus();
}

}  // namespace lc
