// Synthetic tasks (determinism, where evidence and queries sit, what is
// scored) and text files (windows, clear errors for bad files).
#include "train/data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

std::unique_ptr<DataSource> Make(const DataOptions& options) {
  absl::StatusOr<std::unique_ptr<DataSource>> data = CreateDataSource(options);
  EXPECT_TRUE(data.ok()) << data.status();
  return data.ok() ? std::move(*data) : nullptr;
}

std::string TempPath(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/", name);
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

int64_t Token(const Batch& b, int64_t row, int64_t t) {
  return static_cast<int64_t>(b.tokens.at({row, t}));
}
int64_t Target(const Batch& b, int64_t row, int64_t t) {
  return static_cast<int64_t>(b.targets.at({row, t}));
}

TEST(SyntheticTaskTest, BatchesAreAPureFunctionOfSeedSplitAndIndex) {
  DataOptions options;
  options.context = 512;
  options.seed = 7;
  auto data = Make(options);
  const Batch a = data->MakeBatch(3, 5, DataSplit::kTrain);
  const Batch again = Make(options)->MakeBatch(3, 5, DataSplit::kTrain);
  EXPECT_EQ(a.tokens.ToVector(), again.tokens.ToVector());
  EXPECT_EQ(a.targets.ToVector(), again.targets.ToVector());
  EXPECT_NE(a.tokens.ToVector(),
            data->MakeBatch(3, 6, DataSplit::kTrain).tokens.ToVector());
  EXPECT_NE(a.tokens.ToVector(),
            data->MakeBatch(3, 5, DataSplit::kEval).tokens.ToVector());
  options.seed = 8;
  EXPECT_NE(
      a.tokens.ToVector(),
      Make(options)->MakeBatch(3, 5, DataSplit::kTrain).tokens.ToVector());
  // Row r does not depend on the batch size.
  const Batch two = data->MakeBatch(2, 5, DataSplit::kTrain);
  EXPECT_EQ(two.tokens.slice(0, 1, 2).ToVector(),
            a.tokens.slice(0, 1, 2).ToVector());
}

TEST(SyntheticTaskTest, PasskeyPutsTheKeyTheStatedDistanceBeforeEachQuery) {
  DataOptions options;
  options.context = 1024;
  options.min_distance = 300;
  options.max_distance = 900;
  options.queries = 8;
  options.num_keys = 10;
  options.position_stride = 4;
  options.position_offset = 3;
  auto data = Make(options);
  EXPECT_DOUBLE_EQ(data->chance_accuracy(), 0.1);
  const Batch batch = data->MakeBatch(6, 0, DataSplit::kTrain);
  ASSERT_GE(batch.answers.size(), 6u * 7);
  std::set<int64_t> rows_with_answers;
  for (const Answer& answer : batch.answers) {
    const int64_t r = answer.row, t = answer.position;
    rows_with_answers.insert(r);
    EXPECT_GE(answer.distance, 300);
    EXPECT_LE(answer.distance, 900);
    EXPECT_EQ(t % 4, 3);
    EXPECT_EQ(Token(batch, r, t), '?');
    const int64_t key = Token(batch, r, t - answer.distance);
    EXPECT_GE(key, 'A');
    EXPECT_LT(key, 'A' + 10);
    EXPECT_EQ(Target(batch, r, t), key);
  }
  EXPECT_EQ(rows_with_answers.size(), 6u);
  // Only the answers are scored; the key appears once per row; filler is
  // lowercase.
  int64_t scored = 0;
  for (int64_t r = 0; r < 6; ++r) {
    int64_t keys = 0;
    for (int64_t t = 0; t < 1024; ++t) {
      scored += Target(batch, r, t) != -100;
      const int64_t token = Token(batch, r, t);
      keys += token >= 'A' && token <= 'Z';
      EXPECT_TRUE((token >= 'a' && token <= 'z') || token == '?' ||
                  (token >= 'A' && token <= 'Z'))
          << token;
    }
    EXPECT_EQ(keys, 1);
  }
  EXPECT_EQ(scored, static_cast<int64_t>(batch.answers.size()));
}

TEST(SyntheticTaskTest, RecallQueriesAskForTheValueAfterTheirKey) {
  DataOptions options;
  options.task = TaskType::kRecall;
  options.context = 512;
  options.pairs = 5;
  options.queries = 6;
  options.min_distance = 50;
  auto data = Make(options);
  EXPECT_DOUBLE_EQ(data->chance_accuracy(), 0.1);
  EXPECT_EQ(data->max_distance(), 510);
  const Batch batch = data->MakeBatch(4, 3, DataSplit::kEval);
  ASSERT_FALSE(batch.answers.empty());
  for (const Answer& answer : batch.answers) {
    const int64_t r = answer.row, t = answer.position;
    const int64_t value_at = t - answer.distance;
    const int64_t key = Token(batch, r, t);
    EXPECT_GE(key, 'A');
    EXPECT_LE(key, 'Z');
    EXPECT_EQ(Token(batch, r, value_at - 1), key);
    const int64_t value = Token(batch, r, value_at);
    EXPECT_GE(value, '0');
    EXPECT_LE(value, '9');
    EXPECT_EQ(Target(batch, r, t), value);
  }
}

TEST(SyntheticTaskTest, DefaultDistanceReachesAcrossTheContext) {
  DataOptions options;
  options.context = 4096;
  options.position_stride = 16;
  options.position_offset = 1;
  auto data = Make(options);
  EXPECT_EQ(data->max_distance(), 4080);  // positions 1 and 4081
  int64_t longest = 0;
  for (int64_t i = 0; i < 4; ++i) {
    for (const Answer& a : data->MakeBatch(4, i, DataSplit::kTrain).answers) {
      longest = std::max(longest, a.distance);
    }
  }
  EXPECT_GT(longest, 3500);
}

TEST(SyntheticTaskTest, InvalidOptionsAreNamed) {
  DataOptions options;
  options.context = 256;
  options.max_distance = 300;
  EXPECT_THAT(CreateDataSource(options).status().message(),
              AllOf(HasSubstr("distance 300"), HasSubstr("255")));
  options.max_distance = 0;
  options.num_keys = 40;
  EXPECT_THAT(CreateDataSource(options).status().message(),
              HasSubstr("num_keys 40"));
  options.num_keys = 16;
  options.position_stride = 4;
  options.position_offset = 4;
  EXPECT_THAT(CreateDataSource(options).status().message(),
              HasSubstr("offset 4"));
  options.position_offset = 0;
  options.min_distance = 5;
  options.max_distance = 7;
  EXPECT_THAT(CreateDataSource(options).status().message(),
              HasSubstr("no multiple of the position stride 4"));
  EXPECT_THAT(ParseTaskType("copy").status().message(), HasSubstr("\"copy\""));
}

TEST(TextDataTest, WindowsAreBytesWithNextByteTargets) {
  std::string bytes;
  uint32_t state = 12345;  // an LCG: no window repeats
  for (int i = 0; i < 5000; ++i) {
    state = state * 1664525u + 1013904223u;
    bytes.push_back(static_cast<char>(state >> 24));
  }
  const std::string path = TempPath("text.bin");
  WriteFile(path, bytes);
  DataOptions options;
  options.task = TaskType::kText;
  options.context = 100;
  options.path = path;
  auto data = Make(options);
  EXPECT_THAT(data->Describe(), HasSubstr("500 bytes held out"));
  for (DataSplit split : {DataSplit::kTrain, DataSplit::kEval}) {
    const Batch batch = data->MakeBatch(3, 2, split);
    EXPECT_TRUE(batch.answers.empty());
    for (int64_t r = 0; r < 3; ++r) {
      // Find the window's start from its first byte and check every byte.
      const int64_t first = Token(batch, r, 0);
      int64_t start = -1;
      for (int64_t s = 0; s + 101 <= 5000; ++s) {
        bool match = true;
        for (int64_t t = 0; t < 100 && match; ++t) {
          match =
              static_cast<unsigned char>(bytes[s + t]) == Token(batch, r, t);
        }
        if (match) {
          start = s;
          break;
        }
      }
      ASSERT_GE(start, 0) << "row " << r << " first byte " << first;
      EXPECT_EQ(Target(batch, r, 99),
                static_cast<unsigned char>(bytes[start + 100]));
      if (split == DataSplit::kEval) {
        EXPECT_GE(start, 4500);
      } else {
        EXPECT_LE(start + 101, 4500);
      }
    }
  }
}

TEST(TextDataTest, BadFilesGiveErrorsNamingPathAndSizes) {
  DataOptions options;
  options.task = TaskType::kText;
  options.context = 64;
  options.path = TempPath("does_not_exist.txt");
  absl::Status status = CreateDataSource(options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr(options.path));

  options.path = TempPath("empty.txt");
  WriteFile(options.path, "");
  status = CreateDataSource(options).status();
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(options.path), HasSubstr("empty"),
                    HasSubstr("65 bytes")));

  options.path = TempPath("short.txt");
  WriteFile(options.path, std::string(40, 'x'));
  status = CreateDataSource(options).status();
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(options.path), HasSubstr("holds 40 bytes"),
                    HasSubstr("65 bytes")));

  options.path = ::testing::TempDir();
  status = CreateDataSource(options).status();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr("directory"));

  options.path = "";
  EXPECT_THAT(CreateDataSource(options).status().message(),
              HasSubstr("--data"));
}

// A FIFO would block the reader until some writer came (forever, for a
// mistyped --data), /dev/zero never ends: only regular files are text.
TEST(TextDataTest, FilesThatAreNotRegularAreRefusedAtOnce) {
  DataOptions options;
  options.task = TaskType::kText;
  options.context = 64;
  options.path = TempPath("data_fifo");
  std::remove(options.path.c_str());
  ASSERT_EQ(mkfifo(options.path.c_str(), 0600), 0) << std::strerror(errno);
  auto created = std::async(std::launch::async,
                            [&] { return CreateDataSource(options).status(); });
  if (created.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "CreateDataSource waits for a writer of the FIFO";
    // Lets the blocked open return; the reader then meets end of file.
    close(open(options.path.c_str(), O_WRONLY));
  }
  absl::Status status = created.get();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr(options.path), HasSubstr("is a FIFO")));

  options.path = "/dev/zero";
  status = CreateDataSource(options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("/dev/zero"), HasSubstr("character device")));
}

// Pages of this process in memory, from /proc/self/statm.
int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// A 16 GiB file (sparse: it takes no disk) is mapped, not read: memory grows
// with the windows that batches read, not with the file.
TEST(TextDataTest, HugeFileUsesMemoryOnlyForTheWindowsRead) {
  constexpr int64_t kSize = int64_t{16} << 30;
  const std::string path = TempPath("sparse_16g.bin");
  {
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    const int truncated = ftruncate(fd, kSize);
    struct stat info;
    fstat(fd, &info);
    close(fd);
    if (truncated != 0 || info.st_blocks * 512 > (int64_t{1} << 20)) {
      std::remove(path.c_str());
      GTEST_SKIP() << "this filesystem makes no sparse 16 GiB file";
    }
  }
  DataOptions options;
  options.task = TaskType::kText;
  options.context = 4096;
  options.path = path;
  const int64_t before = ResidentBytes();
  {
    auto data = Make(options);
    ASSERT_NE(data, nullptr);
    EXPECT_THAT(data->Describe(), HasSubstr("17179869184 bytes"));
    for (int64_t index = 0; index < 8; ++index) {
      const Batch batch = data->MakeBatch(4, index, DataSplit::kTrain);
      EXPECT_EQ(Token(batch, 3, 4095), 0);  // a hole reads as zeros
      EXPECT_EQ(Target(batch, 3, 4095), 0);
    }
    // 32 windows of 4097 bytes touch at most 64 pages of the file, and each
    // batch holds 2 x 128 KiB of int64 tokens and targets: far below 64 MiB,
    // while reading the file whole (as before) took 16 GiB.
    EXPECT_LT(ResidentBytes() - before, int64_t{64} << 20);
  }
  std::remove(path.c_str());
}

}  // namespace
}  // namespace lc
