#include "core/status.h"

#include <new>
#include <string>
#include <vector>

#include "core/check.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::Status Quarter(int x, int* out) {
  LC_ASSIGN_OR_RETURN(int half, Half(x));
  LC_ASSIGN_OR_RETURN(*out, Half(half));
  return absl::OkStatus();
}

absl::Status Check(bool ok) {
  LC_RETURN_IF_ERROR(ok ? absl::OkStatus() : absl::NotFoundError("missing"));
  return absl::OkStatus();
}

TEST(StatusTest, MacrosPropagateErrorsAndValues) {
  int out = 0;
  EXPECT_TRUE(Quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  EXPECT_EQ(Quarter(6, &out).message(), "odd");
  EXPECT_TRUE(Check(true).ok());
  EXPECT_EQ(Check(false).code(), absl::StatusCode::kNotFound);
}

TEST(StatusTest, StatusFromCallCatchesErrors) {
  EXPECT_TRUE(StatusFromCall([] {}).ok());
  const absl::Status s =
      StatusFromCall([] { LC_REQUIRE(1 + 1 == 3, "math: got ", 2); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "math: got 2");
}

// Sizes come from users: an allocation that fails is their error, reported
// as ResourceExhausted instead of ending the process. The exceptions are
// thrown as the allocator and the containers throw them (a real failing
// allocation would abort under AddressSanitizer instead of throwing).
TEST(StatusTest, StatusFromCallTurnsAllocationFailuresIntoErrors) {
  absl::Status s = StatusFromCall([] { throw std::bad_alloc(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("out of memory"));

  s = StatusFromCall([] {
    std::vector<double> values;
    values.reserve(values.max_size() + size_t{1});  // throws length_error
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("out of memory"));
}

TEST(CheckDeathTest, PrintsFileLineConditionAndValues) {
  const int a = 3, b = 4;
  EXPECT_DEATH(LC_CHECK_EQ(a, b) << "context",
               "status_test.cc:[0-9]+: CHECK failed: .*a = 3, b = 4.*context");
}

}  // namespace
}  // namespace lc
