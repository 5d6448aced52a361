#include "ops/loss.h"

#include <string>
#include <vector>

#include "core/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::lc::testing::ExpectGradientsMatchFiniteDifferences;
using ::lc::testing::ExpectMatchesTorch;
using ::lc::testing::kStridedLayouts;
using ::lc::testing::NonContiguousCopy;
using ::lc::testing::OpFn;
using ::lc::testing::OracleAttrs;
using ::lc::testing::StridedLayout;
using ::lc::testing::StridedLayoutName;
using ::lc::testing::TestGenerator;
using ::testing::AllOf;
using ::testing::HasSubstr;

OpFn CrossEntropyFn(int64_t ignore_index) {
  return [=](const Tensors& in) {
    return Tensors{CrossEntropy(in[0], in[1], ignore_index)};
  };
}

OracleAttrs IgnoreAttrs(int64_t ignore_index) {
  OracleAttrs attrs;
  attrs.numbers["ignore_index"] = static_cast<double>(ignore_index);
  return attrs;
}

Tensor Targets(const std::vector<double>& values) {
  return FromVector(values, {static_cast<int64_t>(values.size())},
                    DType::kInt64);
}

struct LossCase {
  int64_t classes;
  Tensor targets;
  int64_t ignore_index;
};

// No ignored rows, some rows at the default ignore_index, an ignore_index
// that is a valid class, and a single class.
std::vector<LossCase> Cases() {
  return {
      {5, Targets({0, 4, 2, 2}), -100},
      {3, Targets({1, -100, 0, -100, 2, 1}), -100},
      {4, Targets({1, 3, 1, 0, 2}), 1},
      {1, Targets({0, 0, 0}), -100},
  };
}

TEST(CrossEntropyTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const LossCase& c : Cases()) {
      const Shape shape = {c.targets.numel(), c.classes};
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(shape) +
                   " ignore_index " + std::to_string(c.ignore_index));
      const Tensor logits = Randn(shape, gen, dtype);
      ExpectMatchesTorch("cross_entropy", CrossEntropyFn(c.ignore_index),
                         {logits, c.targets}, IgnoreAttrs(c.ignore_index));
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("cross_entropy", CrossEntropyFn(c.ignore_index),
                           {NonContiguousCopy(logits, layout), c.targets},
                           IgnoreAttrs(c.ignore_index));
      }
    }
  }
}

TEST(CrossEntropyTest, MatchesTorchOnLargeLogits) {
  // Logits of magnitude ~100 overflow a naive exp in float32.
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    SCOPED_TRACE(DTypeName(dtype));
    std::vector<double> values = Randn({3, 4}, gen, DType::kFloat64).ToVector();
    for (double& v : values) v *= 100;
    ExpectMatchesTorch("cross_entropy", CrossEntropyFn(-100),
                       {FromVector(values, {3, 4}, dtype), Targets({3, 0, 1})},
                       IgnoreAttrs(-100));
  }
}

TEST(CrossEntropyTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const LossCase& c : Cases()) {
    SCOPED_TRACE(c.classes);
    ExpectGradientsMatchFiniteDifferences(
        CrossEntropyFn(c.ignore_index),
        {Randn({c.targets.numel(), c.classes}, gen, DType::kFloat64),
         c.targets});
  }
}

// torch returns NaN here (0 / 0); we return 0 and a zero gradient so that a
// batch of padding cannot poison training.
TEST(CrossEntropyTest, AllTargetsIgnoredGivesZeroLossAndZeroGradient) {
  Generator gen = TestGenerator();
  const Tensor logits =
      Randn({3, 4}, gen, DType::kFloat64).set_requires_grad(true);
  const Tensor loss = CrossEntropy(logits, Targets({-100, -100, -100}));
  EXPECT_EQ(loss.shape(), Shape{});
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  ASSERT_TRUE(logits.grad().defined());
  EXPECT_EQ(logits.grad().ToVector(), std::vector<double>(12, 0.0));
}

TEST(CrossEntropyTest, RejectsTargetAtOrAboveClassCount) {
  const absl::Status s = StatusFromCall([] {
    CrossEntropy(Zeros({3, 5}), Targets({0, 5, 1}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("CrossEntropy"), HasSubstr("target 5"),
                    HasSubstr("row 1"), HasSubstr("< 5")));
}

TEST(CrossEntropyTest, RejectsNegativeTargetThatIsNotIgnored) {
  const absl::Status s = StatusFromCall([] {
    CrossEntropy(Zeros({2, 5}), Targets({-1, 0}), /*ignore_index=*/-100);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("target -1"), HasSubstr("ignore_index = -100")));
}

TEST(CrossEntropyTest, RejectsTargetsOfWrongLength) {
  const absl::Status s = StatusFromCall([] {
    CrossEntropy(Zeros({4, 5}), Targets({0, 1, 2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("CrossEntropy"), HasSubstr("[3]"), HasSubstr("[4, 5]")));
}

TEST(CrossEntropyTest, RejectsNonIntegerTargets) {
  const absl::Status s = StatusFromCall([] {
    CrossEntropy(Zeros({2, 5}), FromVector({0, 1}, {2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("targets"), HasSubstr("int64")));
}

}  // namespace
}  // namespace lc
