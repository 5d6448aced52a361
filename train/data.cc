#include "train/data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/files.h"
#include "core/random.h"
#include "core/status.h"

namespace lc {
namespace {

constexpr int64_t kIgnore = -100;
// Keeps the data streams apart from the model's initialization, which draws
// from Generator(seed) with the same seed.
constexpr uint64_t kDataKeyMix = 0x9E3779B97F4A7C15ull;
constexpr int kPlacementAttempts = 64;
constexpr char kQueryToken = '?';
constexpr int64_t kMaxKeys = 26;    // 'A'..'Z'
constexpr int64_t kNumValues = 10;  // '0'..'9'

// Independent 64-bit draws for one (split, batch index, row): draw c is
// Philox(seed ^ mix, 2 * index + split, row << 32 | c).
class Draws {
 public:
  Draws(uint64_t seed, DataSplit split, int64_t index, int64_t row)
      : key_(seed ^ kDataKeyMix),
        counter_hi_(2 * static_cast<uint64_t>(index) +
                    (split == DataSplit::kEval ? 1 : 0)),
        row_(static_cast<uint64_t>(row) << 32) {}

  // Uniform in [lo, hi] (inclusive; lo <= hi). The modulo bias is below
  // 2^-40 for the ranges used here.
  int64_t Uniform(int64_t lo, int64_t hi) {
    const std::array<uint32_t, 4> w = Philox(key_, counter_hi_, row_ | next_++);
    const uint64_t bits = (static_cast<uint64_t>(w[0]) << 32) | w[1];
    return lo + static_cast<int64_t>(bits % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  uint64_t key_;
  uint64_t counter_hi_;
  uint64_t row_;
  uint64_t next_ = 0;
};

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A batch of `batch_size` rows of `context` tokens, uninitialized. Throws
// lc::Error naming the batch size and the context when they are out of range
// or their tokens and targets do not fit in memory (ResourceExhausted).
Batch EmptyBatch(int64_t batch_size, int64_t context) {
  LC_REQUIRE(batch_size >= 1, "MakeBatch: batch size ", batch_size,
             " (expected >= 1)");
  const std::string what = absl::StrCat("a batch of ", batch_size,
                                        " sequences of context ", context);
  int64_t bytes = 0;
  if (__builtin_mul_overflow(batch_size, context, &bytes) ||
      __builtin_mul_overflow(bytes, int64_t{sizeof(int64_t)}, &bytes)) {
    throw Error(absl::ResourceExhaustedError(
        absl::StrCat(what,
                     " needs 2^63 bytes or more of tokens (expected a "
                     "smaller batch or context)")));
  }
  Batch batch;
  const absl::Status status = StatusFromCall([&] {
    batch.tokens = Empty({batch_size, context}, DType::kInt64);
    batch.targets = Empty({batch_size, context}, DType::kInt64);
  });
  if (!status.ok()) {
    throw Error(absl::Status(
        status.code(),
        absl::StrCat(what, " needs 2 x ", bytes,
                     " bytes (tokens and targets): ", status.message())));
  }
  return batch;
}

class SyntheticTask : public DataSource {
 public:
  explicit SyntheticTask(const DataOptions& options) : options_(options) {
    if (options_.max_distance == 0)
      max_distance_ = LargestDistance(options_);
    else
      max_distance_ = options_.max_distance;
  }

  // The largest query - evidence distance that fits: both on aligned
  // positions, the evidence at or after `lowest` (recall keeps its key
  // before the value).
  static int64_t LargestDistance(const DataOptions& options) {
    const int64_t s = options.position_stride;
    const int64_t lowest = options.task == TaskType::kRecall ? 1 : 0;
    const int64_t first = FirstAligned(options, lowest);
    const int64_t last =
        (options.context - 1 - options.position_offset) / s * s +
        options.position_offset;
    return last - first;
  }

  static int64_t FirstAligned(const DataOptions& options, int64_t at_least) {
    const int64_t s = options.position_stride;
    const int64_t o = options.position_offset;
    return at_least <= o ? o : o + CeilDiv(at_least - o, s) * s;
  }

  Batch MakeBatch(int64_t batch_size, int64_t index,
                  DataSplit split) const override {
    const int64_t n = options_.context;
    Batch batch = EmptyBatch(batch_size, n);
    std::fill_n(batch.targets.data<int64_t>(), batch_size * n, kIgnore);
    for (int64_t row = 0; row < batch_size; ++row) {
      FillRow(Draws(options_.seed, split, index, row), row,
              batch.tokens.data<int64_t>() + row * n,
              batch.targets.data<int64_t>() + row * n, &batch.answers);
    }
    return batch;
  }

  double chance_accuracy() const override {
    return options_.task == TaskType::kPasskey
               ? 1.0 / static_cast<double>(options_.num_keys)
               : 1.0 / static_cast<double>(kNumValues);
  }
  int64_t max_distance() const override { return max_distance_; }

  std::string Describe() const override {
    std::string what =
        options_.task == TaskType::kPasskey
            ? absl::StrCat("passkey retrieval: one of ", options_.num_keys,
                           " keys")
            : absl::StrCat("associative recall: ", options_.pairs,
                           " key-value pairs, ", kNumValues, " values");
    std::string aligned =
        options_.position_stride > 1
            ? absl::StrCat(", evidence and queries at positions = ",
                           options_.position_offset, " mod ",
                           options_.position_stride)
            : "";
    return absl::StrFormat(
        "%s (chance %.1f%%), %d queries per sequence at distances %d..%d%s, "
        "context %d",
        what, 100 * chance_accuracy(), options_.queries, options_.min_distance,
        max_distance_, aligned, options_.context);
  }

 private:
  void FillRow(Draws draws, int64_t row, int64_t* tokens, int64_t* targets,
               std::vector<Answer>* answers) const {
    const int64_t n = options_.context;
    const int64_t s = options_.position_stride;
    const bool recall = options_.task == TaskType::kRecall;
    for (int64_t t = 0; t < n; ++t) tokens[t] = 'a' + draws.Uniform(0, 25);

    // Keys (distinct per sequence) and values of the pairs; passkey has one
    // "pair" whose key is the answer.
    const int64_t num_pairs = recall ? options_.pairs : 1;
    std::vector<int64_t> keys(kMaxKeys);
    for (int64_t i = 0; i < kMaxKeys; ++i) keys[i] = 'A' + i;
    const int64_t key_choices = recall ? kMaxKeys : options_.num_keys;
    for (int64_t i = 0; i < num_pairs; ++i) {  // partial Fisher-Yates
      std::swap(keys[i], keys[draws.Uniform(i, key_choices - 1)]);
    }
    std::vector<int64_t> values(num_pairs);
    for (int64_t& v : values) v = '0' + draws.Uniform(0, kNumValues - 1);

    // Distances in units of the stride, and which pair each query asks for.
    const int64_t min_units = CeilDiv(options_.min_distance, s);
    const int64_t max_units = max_distance_ / s;
    std::vector<int64_t> pair_of(options_.queries);
    std::vector<int64_t> distance(options_.queries);
    std::vector<int64_t> reach(num_pairs, 0);  // longest distance per pair
    for (int64_t j = 0; j < options_.queries; ++j) {
      pair_of[j] = draws.Uniform(0, num_pairs - 1);
      distance[j] = s * draws.Uniform(min_units, max_units);
      reach[pair_of[j]] = std::max(reach[pair_of[j]], distance[j]);
    }

    // Evidence: the value position (the key sits just before it for
    // recall), aligned, far enough from the end for the pair's queries.
    std::set<int64_t> occupied;
    std::vector<int64_t> evidence(num_pairs, -1);
    const int64_t first = FirstAligned(options_, recall ? 1 : 0);
    for (int64_t i = 0; i < num_pairs; ++i) {
      const int64_t last = n - 1 - reach[i];
      if (last < first) continue;
      for (int attempt = 0; attempt < kPlacementAttempts; ++attempt) {
        const int64_t e = first + s * draws.Uniform(0, (last - first) / s);
        if (occupied.count(e) || (recall && occupied.count(e - 1))) continue;
        evidence[i] = e;
        occupied.insert(e);
        if (recall) {
          occupied.insert(e - 1);
          tokens[e - 1] = keys[i];
          tokens[e] = values[i];
        } else {
          tokens[e] = keys[i];
        }
        break;
      }
    }

    // Queries: the evidence's position plus the distance; a collision draws
    // a new distance that still fits.
    for (int64_t j = 0; j < options_.queries; ++j) {
      const int64_t i = pair_of[j];
      const int64_t e = evidence[i];
      if (e < 0) continue;
      const int64_t fit_units = std::min(max_units, (n - 1 - e) / s);
      int64_t t = e + distance[j];
      for (int attempt = 0; occupied.count(t) && attempt < kPlacementAttempts;
           ++attempt) {
        t = e + s * draws.Uniform(min_units, fit_units);
      }
      if (occupied.count(t)) continue;
      occupied.insert(t);
      tokens[t] = recall ? keys[i] : kQueryToken;
      targets[t] = recall ? values[i] : keys[i];
      answers->push_back({row, t, t - e});
    }
  }

  DataOptions options_;
  int64_t max_distance_ = 0;
};

// A read-only memory map of a whole file: the pages a window touches are read
// on demand (and can be dropped again by the kernel), so memory stays bounded
// by the windows, whatever the file's size. Const after construction, so
// rank threads share it.
class MappedFile {
 public:
  MappedFile(const void* data, int64_t size) : data_(data), size_(size) {}
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { munmap(const_cast<void*>(data_), size_); }

  const unsigned char* bytes() const {
    return static_cast<const unsigned char*>(data_);
  }
  int64_t size() const { return size_; }

  // Starts reading bytes [offset, offset + length) in one go: the map reads
  // no more than a fault needs (MADV_RANDOM), and a window is read whole.
  void WillRead(int64_t offset, int64_t length) const {
    static const int64_t page = sysconf(_SC_PAGESIZE);
    const int64_t first = offset / page * page;
    madvise(const_cast<unsigned char*>(bytes()) + first,
            offset + length - first, MADV_WILLNEED);
  }

 private:
  const void* data_;
  int64_t size_;
};

class TextData : public DataSource {
 public:
  TextData(const DataOptions& options, std::unique_ptr<MappedFile> file)
      : options_(options), file_(std::move(file)) {
    const int64_t size = file_->size();
    const int64_t window = options_.context + 1;
    const int64_t held_out = size / 10;
    if (held_out >= window && size - held_out >= window) {
      train_ = {0, size - held_out};
      eval_ = {size - held_out, size};
    } else {
      train_ = eval_ = {0, size};
    }
  }

  Batch MakeBatch(int64_t batch_size, int64_t index,
                  DataSplit split) const override {
    const int64_t n = options_.context;
    const auto [begin, end] = split == DataSplit::kTrain ? train_ : eval_;
    Batch batch = EmptyBatch(batch_size, n);
    const unsigned char* bytes = file_->bytes();
    for (int64_t row = 0; row < batch_size; ++row) {
      Draws draws(options_.seed, split, index, row);
      const int64_t start = begin + draws.Uniform(0, end - begin - n - 1);
      file_->WillRead(start, n + 1);
      int64_t* tokens = batch.tokens.data<int64_t>() + row * n;
      int64_t* targets = batch.targets.data<int64_t>() + row * n;
      for (int64_t t = 0; t < n; ++t) {
        tokens[t] = bytes[start + t];
        targets[t] = bytes[start + t + 1];
      }
    }
    return batch;
  }

  double chance_accuracy() const override { return 0; }
  int64_t max_distance() const override { return 0; }
  std::string Describe() const override {
    return absl::StrCat(
        "text ", options_.path, ": ", file_->size(), " bytes, windows of ",
        options_.context, " bytes",
        train_ == eval_
            ? " (too short to hold out an evaluation part: evaluation windows "
              "come from the same bytes)"
            : absl::StrCat(", the last ", eval_.second - eval_.first,
                           " bytes held out for evaluation"));
  }

 private:
  DataOptions options_;
  std::unique_ptr<MappedFile> file_;
  std::pair<int64_t, int64_t> train_, eval_;  // [begin, end) byte ranges
};

// Maps the text file at options.path. Errors name the path: a missing or
// unreadable file, one that is not a regular file (a FIFO would block a
// reader, /dev/zero never ends), an empty one or one shorter than a window.
absl::StatusOr<std::unique_ptr<MappedFile>> MapTextFile(
    const DataOptions& options) {
  const std::string& path = options.path;
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer before the
  // check below could refuse it.
  const int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    return absl::ErrnoToStatus(
        error, absl::StrCat("data file ", path,
                            " cannot be opened (missing or unreadable)"));
  }
  struct stat info;
  if (fstat(fd, &info) != 0) {
    const int error = errno;
    close(fd);
    return absl::ErrnoToStatus(error, absl::StrCat("data file ", path,
                                                   " cannot be "
                                                   "examined (fstat failed)"));
  }
  if (!S_ISREG(info.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("data file ", path, " is ", FileTypeName(info.st_mode),
                     " (expected a regular file, read as bytes)"));
  }
  const int64_t size = info.st_size;
  if (size == 0) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "data file ", path, " is empty (0 bytes; a window of context ",
        options.context, " needs ", static_cast<uint64_t>(options.context) + 1,
        " bytes)"));
  }
  // Unsigned: context + 1 must not overflow for the largest context.
  const uint64_t window = static_cast<uint64_t>(options.context) + 1;
  if (static_cast<uint64_t>(size) < window) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "data file ", path, " holds ", size,
        " bytes, fewer than one window of context ", options.context,
        " needs (", window,
        " bytes: the tokens and the next byte); use a smaller --context or a "
        "longer file"));
  }
  void* data = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int error = errno;
  close(fd);  // the mapping keeps the file open
  if (data == MAP_FAILED) {
    return absl::ErrnoToStatus(
        error, absl::StrCat("data file ", path, ": cannot map its ", size,
                            " bytes into memory"));
  }
  // Windows start at random places: reading ahead of a fault would mostly
  // read bytes that no window uses (MakeBatch asks for each window instead).
  madvise(data, size, MADV_RANDOM);
  return std::make_unique<MappedFile>(data, size);
}

absl::Status ValidateSynthetic(const DataOptions& o) {
  auto invalid = [](auto&&... pieces) {
    return absl::InvalidArgumentError(absl::StrCat(pieces...));
  };
  if (o.position_stride < 1 || o.position_offset < 0 ||
      o.position_offset >= o.position_stride) {
    return invalid("position stride ", o.position_stride, " and offset ",
                   o.position_offset,
                   " (expected stride >= 1 and 0 <= offset < stride)");
  }
  if (o.queries < 1) return invalid("queries ", o.queries, " (expected >= 1)");
  if (o.task == TaskType::kPasskey &&
      (o.num_keys < 2 || o.num_keys > kMaxKeys)) {
    return invalid("num_keys ", o.num_keys, " (expected 2..", kMaxKeys, ")");
  }
  if (o.task == TaskType::kRecall && (o.pairs < 1 || o.pairs > kMaxKeys)) {
    return invalid("pairs ", o.pairs, " (expected 1..", kMaxKeys, ")");
  }
  const int64_t largest = SyntheticTask::LargestDistance(o);
  const int64_t s = o.position_stride;
  if (o.min_distance < 1) {
    return invalid("min distance ", o.min_distance, " (expected >= 1)");
  }
  if (o.max_distance < 0 || o.max_distance > largest) {
    return invalid(
        "distance ", o.max_distance, " (expected 1..", largest, ", or 0 for ",
        largest, ": the farthest evidence and query fit in context ", o.context,
        s > 1 ? absl::StrCat(" on positions = ", o.position_offset, " mod ", s)
              : "",
        ")");
  }
  const int64_t max_distance = o.max_distance == 0 ? largest : o.max_distance;
  if (CeilDiv(o.min_distance, s) > max_distance / s) {
    return invalid("distances ", o.min_distance, "..", max_distance,
                   " hold no multiple of the position stride ", s);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TaskType> ParseTaskType(const std::string& name) {
  if (name == "passkey") return TaskType::kPasskey;
  if (name == "recall") return TaskType::kRecall;
  if (name == "text") return TaskType::kText;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown task \"", name, "\" (expected passkey, recall or text)"));
}

std::string TaskTypeName(TaskType type) {
  switch (type) {
    case TaskType::kPasskey:
      return "passkey";
    case TaskType::kRecall:
      return "recall";
    case TaskType::kText:
      return "text";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<DataSource>> CreateDataSource(
    const DataOptions& options) {
  if (options.context < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("context ", options.context, " (expected >= 2 tokens)"));
  }
  if (options.task != TaskType::kText) {
    LC_RETURN_IF_ERROR(ValidateSynthetic(options));
    return std::unique_ptr<DataSource>(new SyntheticTask(options));
  }
  if (options.path.empty()) {
    return absl::InvalidArgumentError(
        "task text needs a file: --data=PATH (any file, read as bytes)");
  }
  LC_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> file, MapTextFile(options));
  return std::unique_ptr<DataSource>(new TextData(options, std::move(file)));
}

}  // namespace lc
