#include "ops/loss.h"

#include <algorithm>
#include <cmath>
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

OpFn CrossEntropyFn(int64_t ignore_index,
                    LossReduction reduction = LossReduction::kMean) {
  return [=](const Tensors& in) {
    return Tensors{CrossEntropy(in[0], in[1], ignore_index, reduction)};
  };
}

OracleAttrs IgnoreAttrs(int64_t ignore_index) {
  OracleAttrs attrs;
  attrs.numbers["ignore_index"] = static_cast<double>(ignore_index);
  return attrs;
}

// torch's cross_entropy(..., reduction='sum').
OracleAttrs SumAttrs(int64_t ignore_index) {
  OracleAttrs attrs = IgnoreAttrs(ignore_index);
  attrs.strings["reduction"] = "sum";
  return attrs;
}

Tensor Targets(const std::vector<double>& values) {
  return FromVector(values, {static_cast<int64_t>(values.size())},
                    DType::kInt64);
}

// Fresh targets for `rows` rows of `classes` classes: row 0 and about one
// row in four besides are ignore_index, the others uniform in [0, classes).
Tensor RandomTargets(int64_t rows, int64_t classes, int64_t ignore_index,
                     Generator& gen) {
  const std::vector<double> u =
      Rand({rows, 2}, gen, DType::kFloat64).ToVector();
  std::vector<double> targets(rows);
  for (int64_t i = 0; i < rows; ++i) {
    targets[i] = i == 0 || u[2 * i] < 0.25
                     ? ignore_index
                     : std::min<int64_t>(classes - 1, u[2 * i + 1] * classes);
  }
  return Targets(targets);
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

// reduction='sum' on fresh logits and targets with ignored rows (at -100
// and at an ignore_index that is a valid class): the sum without the
// division by the count, and its gradient g * (softmax - onehot) on scored
// rows. bfloat16 goes through the float32 path, which must keep the
// reduction. Tolerances: DefaultTolerance of the logits' dtype (the oracle
// computes in float64 from the same, rounded, values).
TEST(CrossEntropyTest, SumMatchesTorch) {
  Generator gen = TestGenerator();
  struct SumCase {
    int64_t rows;
    int64_t classes;
    int64_t ignore_index;
  };
  const std::vector<SumCase> cases = {
      {6, 5, -100},
      {17, 3, -100},
      {40, 11, -100},
      {9, 4, 2},
      {1, 7, -100}};  // the last: row 0 only, ignored
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    for (const SumCase& c : cases) {
      const Tensor targets =
          RandomTargets(c.rows, c.classes, c.ignore_index, gen);
      SCOPED_TRACE(DTypeName(dtype) + " [" + std::to_string(c.rows) + ", " +
                   std::to_string(c.classes) + "] targets " +
                   ::testing::PrintToString(targets.ToVector()));
      const Tensor logits = Randn({c.rows, c.classes}, gen, dtype);
      ExpectMatchesTorch("cross_entropy",
                         CrossEntropyFn(c.ignore_index, LossReduction::kSum),
                         {logits, targets}, SumAttrs(c.ignore_index));
      if (dtype == DType::kBFloat16) continue;
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("cross_entropy",
                           CrossEntropyFn(c.ignore_index, LossReduction::kSum),
                           {NonContiguousCopy(logits, layout), targets},
                           SumAttrs(c.ignore_index));
      }
    }
  }
}

// The sum of several scored rows is their mean times their count: the two
// reductions differ (a sum implemented as the mean would fail here).
TEST(CrossEntropyTest, SumIsMeanTimesScoredRows) {
  Generator gen = TestGenerator();
  const Tensor logits = Randn({12, 6}, gen, DType::kFloat64);
  const Tensor targets = RandomTargets(12, 6, -100, gen);
  int64_t scored = 0;
  for (double t : targets.ToVector()) scored += t != -100;
  ASSERT_GT(scored, 1);
  const double sum =
      CrossEntropy(logits, targets, -100, LossReduction::kSum).item();
  const double mean = CrossEntropy(logits, targets).item();
  // float64: both sum the same rows in double; the division adds ~1e-16.
  EXPECT_NEAR(sum, mean * scored, 1e-12 * std::abs(sum));
}

TEST(CrossEntropyTest, SumGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const LossCase& c : Cases()) {
    SCOPED_TRACE(c.classes);
    ExpectGradientsMatchFiniteDifferences(
        CrossEntropyFn(c.ignore_index, LossReduction::kSum),
        {Randn({c.targets.numel(), c.classes}, gen, DType::kFloat64),
         c.targets});
  }
}

// torch's sum over no rows is 0 with a zero gradient, as ours; checked
// against torch, and exactly (no rounding can make 0 of an empty sum).
TEST(CrossEntropyTest, SumOfAllTargetsIgnoredIsZeroWithZeroGradient) {
  Generator gen = TestGenerator();
  const Tensor targets = Targets({-100, -100, -100});
  const Tensor logits = Randn({3, 4}, gen, DType::kFloat64);
  ExpectMatchesTorch("cross_entropy", CrossEntropyFn(-100, LossReduction::kSum),
                     {logits, targets}, SumAttrs(-100));
  const Tensor leaf = logits.detach().set_requires_grad(true);
  const Tensor loss = CrossEntropy(leaf, targets, -100, LossReduction::kSum);
  EXPECT_EQ(loss.shape(), Shape{});
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  ASSERT_TRUE(leaf.grad().defined());
  EXPECT_EQ(leaf.grad().ToVector(), std::vector<double>(12, 0.0));
}

TEST(CrossEntropyTest, SumRejectsOutOfRangeTarget) {
  const absl::Status s = StatusFromCall([] {
    CrossEntropy(Zeros({3, 5}), Targets({0, 5, 1}), -100, LossReduction::kSum);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("CrossEntropy"), HasSubstr("target 5"),
                    HasSubstr("row 1"), HasSubstr("< 5")));
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
