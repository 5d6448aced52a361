// //train on inputs that are not what they claim, or too large for memory:
// a FIFO or a device as --data is refused at once (a FIFO used to block
// forever, /dev/zero to end in std::bad_alloc), and a model or batch whose
// memory the machine cannot provide exits 1 with one line naming the sizes
// instead of "uncaught exception: std::bad_alloc".
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tools/run_program.h"
#include "tests/tools/train_cli_util.h"

namespace lc {
namespace {

using ::lc::testing::ExpectTrainError;
using ::lc::testing::kTiny;
using ::lc::testing::ProgramResult;
using ::testing::HasSubstr;

// A failed allocation aborts an AddressSanitizer build (its allocator does
// not return null by default) instead of throwing std::bad_alloc, so the
// cases that rely on a failing allocation are skipped there.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif

// //train with kTiny and `flags`, killed after 60 s so that a run that
// blocks (on a FIFO) fails the test instead of hanging it. Expects exit 1
// within 10 s and ExpectTrainError's one error line (after the run's
// "model:" and "data:" lines unless `alone`: a batch is first made at the
// first step).
void ExpectQuickError(const std::vector<std::string>& flags,
                      const std::vector<std::string>& pieces,
                      bool alone = true) {
  SCOPED_TRACE(absl::StrJoin(flags, " "));
  std::vector<std::string> args = {"60", testing::kTrain};
  args.insert(args.end(), kTiny.begin(), kTiny.end());
  args.insert(args.end(), flags.begin(), flags.end());
  const auto start = std::chrono::steady_clock::now();
  const ProgramResult result = testing::RunProgram("timeout", args);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  // Exit status 124 would mean that it blocked.
  ExpectTrainError(result, pieces, alone);
}

TEST(TrainCliInputTest, FifoAsDataIsRefusedAtOnce) {
  const std::string fifo = testing::FreshDir("fifo_data") + "/corpus";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  ExpectQuickError({"--steps=1", "--task=text", "--data=" + fifo},
                   {"train: ", fifo, "is a FIFO", "regular file"});
}

TEST(TrainCliInputTest, DeviceAsDataIsRefused) {
  ExpectQuickError(
      {"--steps=1", "--task=text", "--data=/dev/zero"},
      {"train: ", "/dev/zero", "is a character device", "regular file"});
}

TEST(TrainCliInputTest, ModelBeyondMemoryNamesItsSizes) {
  // 9.6e13 bytes of weights (within a 47-bit address space): refused before
  // any weight is made, unless the kernel overcommits without limit.
  std::string overcommit;
  std::ifstream("/proc/sys/vm/overcommit_memory") >> overcommit;
  if (overcommit == "1") GTEST_SKIP() << "vm.overcommit_memory is 1";
  ExpectQuickError({"--steps=1", "--d_model=1000000"},
                   {"train: ", "d_model 1000000", "96001024000000 bytes",
                    "more memory than this machine can provide"});
}

TEST(TrainCliInputTest, BatchBeyondMemoryNamesBatchAndContext) {
  if (kAddressSanitizer) GTEST_SKIP() << "a failed allocation aborts ASan";
  ExpectQuickError({"--steps=1", "--batch=1000000000"},
                   {"a batch of 1000000000 sequences of context 128",
                    "2 x 1024000000000 bytes"},
                   /*alone=*/false);
  ExpectQuickError({"--steps=1", "--context=1000000000000",
                    "--segment_lengths=32,128", "--batch=2"},
                   {"a batch of 2 sequences of context 1000000000000"},
                   /*alone=*/false);
}

}  // namespace
}  // namespace lc
