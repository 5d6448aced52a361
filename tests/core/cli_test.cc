// Tests of core/cli: the helpers the command-line tools share (paths under
// `bazel run`, the --device flag, list flags, number flags that are off
// unless given, flag-named errors, the body of main()).
#include "core/cli.h"

#include <cstdlib>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/cuda.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

using ::testing::HasSubstr;

TEST(CliTest, UserPathIsRelativeToWhereBazelRunWasCalled) {
  ASSERT_EQ(setenv("BUILD_WORKING_DIRECTORY", "/home/user/work", 1), 0);
  EXPECT_EQ(UserPath("out.safetensors"), "/home/user/work/out.safetensors");
  EXPECT_EQ(UserPath("runs/a.jsonl"), "/home/user/work/runs/a.jsonl");
  EXPECT_EQ(UserPath("/tmp/x"), "/tmp/x");  // absolute: unchanged
  EXPECT_EQ(UserPath(""), "");
  ASSERT_EQ(unsetenv("BUILD_WORKING_DIRECTORY"), 0);
  EXPECT_EQ(UserPath("out.safetensors"), "out.safetensors");
}

TEST(CliTest, DeviceFlagTakesCpuCudaAndCudaN) {
  ASSERT_TRUE(ParseDeviceFlag("cpu").ok());
  EXPECT_TRUE(ParseDeviceFlag("cpu")->is_cpu());
  for (const char* bad :
       {"gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "cuda0", ""}) {
    const absl::StatusOr<Device> parsed = ParseDeviceFlag(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(parsed.status().message()),
                HasSubstr(std::string("--device=") + bad +
                          " (expected cpu, cuda or cuda:N)"));
  }
  // A device past the machine's count names the count (on a machine with no
  // GPU every CUDA device is past it).
  const int count = CudaDeviceCount();
  const std::string past = "cuda:" + std::to_string(count);
  const absl::StatusOr<Device> parsed = ParseDeviceFlag(past);
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(std::string(parsed.status().message()),
              HasSubstr("--device=" + past + ": this machine has " +
                        std::to_string(count) + " CUDA devices"));
  if (count > 0) {
    ASSERT_TRUE(ParseDeviceFlag("cuda").ok());
    EXPECT_EQ(*ParseDeviceFlag("cuda"), Device::Cuda(0));
    EXPECT_EQ(*ParseDeviceFlag("cuda:" + std::to_string(count - 1)),
              Device::Cuda(count - 1));
  }
}

TEST(CliTest, IntListFlagsParseOrNameTheBadPiece) {
  EXPECT_EQ(*ParseIntListFlag("segment_lengths", "2048,4096"),
            std::vector<int64_t>({2048, 4096}));
  EXPECT_EQ(*ParseIntListFlag("segment_lengths", "-3"),
            std::vector<int64_t>({-3}));
  EXPECT_TRUE(ParseIntListFlag("segment_lengths", "")->empty());
  for (const char* bad : {"1,x", "1,,2", "1.5", "2048,"}) {
    const absl::StatusOr<std::vector<int64_t>> parsed =
        ParseIntListFlag("dilation_rates", bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_THAT(std::string(parsed.status().message()),
                HasSubstr(std::string("--dilation_rates=") + bad + ": \""));
    EXPECT_THAT(std::string(parsed.status().message()),
                HasSubstr("is not an integer"));
  }
}

TEST(CliTest, ForFlagPrefixesOnlyErrors) {
  EXPECT_EQ(*ForFlag("x", absl::StatusOr<int>(3)), 3);
  const absl::StatusOr<int> failed =
      ForFlag("layout", absl::StatusOr<int>(absl::NotFoundError("no such")));
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(failed.status().message(), "--layout: no such");
}

// Off (0) while not given; given, it must be a finite number > 0 (0 is
// refused too: leaving the flag out is how to turn it off).
TEST(CliTest, PositiveFlagIfGivenIsOffUntilGivenThenPositive) {
  EXPECT_EQ(*PositiveFlagIfGiven("cap", std::nullopt), 0);
  EXPECT_EQ(*PositiveFlagIfGiven("cap", 2.5), 2.5);
  for (double bad : {0.0, -1.0, std::numeric_limits<double>::infinity(),
                     std::numeric_limits<double>::quiet_NaN()}) {
    const absl::StatusOr<double> cap = PositiveFlagIfGiven("cap", bad);
    EXPECT_EQ(cap.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(cap.status().message(),
              absl::StrCat("--cap=", bad,
                           " (expected a finite number > 0; without --cap it "
                           "is off)"));
  }
}

TEST(CliTest, PositiveIntegerListsExitWithTheFlagAndItem) {
  EXPECT_EQ(PositiveIntegersOrExit("bench", "lengths", {"4096", "8192"}),
            std::vector<int64_t>({4096, 8192}));
  EXPECT_EXIT(PositiveIntegersOrExit("bench", "lengths", {"4096", "0"}),
              ::testing::ExitedWithCode(2),
              "bench: --lengths has \"0\" \\(expected positive integers\\)");
  EXPECT_EXIT(PositiveIntegersOrExit("bench", "lengths", {"x"}),
              ::testing::ExitedWithCode(2), "--lengths has \"x\"");
}

TEST(CliTest, RunToolRefusesPositionalArgumentsAndPrintsOneLine) {
  char program[] = "tool";
  char stray[] = "stray";
  char* with_stray[] = {program, stray, nullptr};
  bool ran = false;
  testing::internal::CaptureStderr();
  EXPECT_EQ(RunTool("tool", 2, with_stray,
                    [&] {
                      ran = true;
                      return absl::OkStatus();
                    }),
            1);
  EXPECT_FALSE(ran);
  EXPECT_EQ(testing::internal::GetCapturedStderr(),
            "tool: unexpected argument \"stray\" (expected only flags of the "
            "form --name=value)\n");

  char* alone[] = {program, nullptr};
  testing::internal::CaptureStderr();
  EXPECT_EQ(RunTool("tool", 1, alone,
                    [] { return absl::InvalidArgumentError("two\nlines"); }),
            1);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "tool: two lines\n");
  EXPECT_EQ(RunTool("tool", 1, alone, [] { return absl::OkStatus(); }), 0);
}

TEST(CliTest, RunToolPrintsAFailedAllocationAsOneLine) {
  char program[] = "tool";
  char* alone[] = {program, nullptr};
  testing::internal::CaptureStderr();
  EXPECT_EQ(RunTool("tool", 1, alone,
                    []() -> absl::Status { throw std::bad_alloc(); }),
            1);
  const std::string printed = testing::internal::GetCapturedStderr();
  EXPECT_THAT(printed, ::testing::StartsWith("tool: out of memory: "));
  EXPECT_EQ(printed.find('\n'), printed.size() - 1) << printed;
}

}  // namespace
}  // namespace lc
