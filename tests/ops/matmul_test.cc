#include "ops/matmul.h"

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

OpFn MatmulFn(bool transpose_a, bool transpose_b) {
  return [=](const Tensors& in) {
    return Tensors{Matmul(in[0], in[1], transpose_a, transpose_b)};
  };
}

OracleAttrs TransposeAttrs(bool transpose_a, bool transpose_b) {
  OracleAttrs attrs;
  attrs.numbers["transpose_a"] = transpose_a;
  attrs.numbers["transpose_b"] = transpose_b;
  return attrs;
}

struct MatmulCase {
  Shape a;
  Shape b;
  bool transpose_a;
  bool transpose_b;
};

// Plain, batched with a shared b (one folded GEMM), broadcast batch dims on
// both sides, a shared 2-D a, every transpose combination, and degenerate
// sizes.
const std::vector<MatmulCase>& Cases() {
  static const auto* cases = new std::vector<MatmulCase>{
      {{3, 4}, {4, 5}, false, false},
      {{2, 3, 4}, {4, 5}, false, false},
      {{2, 1, 3, 4}, {3, 4, 2}, false, false},
      {{4, 3}, {2, 5, 4}, true, true},
      {{2, 4, 3}, {2, 4, 5}, true, false},
      {{2, 3, 4}, {5, 4}, false, true},
      {{3, 2, 6}, {2, 6}, true, false},
      {{1, 7}, {7, 1}, false, false},
      {{5, 1}, {1, 3}, false, false},
  };
  return *cases;
}

std::string Describe(const MatmulCase& c) {
  return ShapeToString(c.a) + (c.transpose_a ? "^T" : "") + " @ " +
         ShapeToString(c.b) + (c.transpose_b ? "^T" : "");
}

TEST(MatmulTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    for (const MatmulCase& c : Cases()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + Describe(c));
      ExpectMatchesTorch("matmul", MatmulFn(c.transpose_a, c.transpose_b),
                         {Randn(c.a, gen, dtype), Randn(c.b, gen, dtype)},
                         TransposeAttrs(c.transpose_a, c.transpose_b));
    }
  }
}

TEST(MatmulTest, MatchesTorchOnNonContiguousInputs) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const MatmulCase& c : Cases()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + Describe(c));
      // Every other column of a wider buffer: no unit stride in either of
      // the last two dims, so the kernel copies; transposed: the batch or
      // row dim strided out of order.
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("matmul", MatmulFn(c.transpose_a, c.transpose_b),
                           {NonContiguousCopy(Randn(c.a, gen, dtype), layout),
                            NonContiguousCopy(Randn(c.b, gen, dtype), layout)},
                           TransposeAttrs(c.transpose_a, c.transpose_b));
      }
    }
  }
}

TEST(MatmulTest, MatchesTorchOnTransposedViews) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const MatmulCase& c : Cases()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + Describe(c));
      // Column-major copies of the operands with the original flags, and the
      // transposed views with the flags flipped (the same product): Eigen
      // maps both layouts without a copy.
      const Tensor a = Randn(c.a, gen, dtype);
      const Tensor b = Randn(c.b, gen, dtype);
      const Tensor a_view = a.transpose(-1, -2).contiguous().transpose(-1, -2);
      const Tensor b_view = b.transpose(-1, -2).contiguous().transpose(-1, -2);
      ExpectMatchesTorch("matmul", MatmulFn(c.transpose_a, c.transpose_b),
                         {a_view, b_view},
                         TransposeAttrs(c.transpose_a, c.transpose_b));
      ExpectMatchesTorch("matmul", MatmulFn(!c.transpose_a, !c.transpose_b),
                         {a.transpose(-1, -2), b.transpose(-1, -2)},
                         TransposeAttrs(!c.transpose_a, !c.transpose_b));
    }
  }
}

TEST(MatmulTest, MatchesTorchOnStridedBatchViews) {
  Generator gen = TestGenerator();
  // a sliced along its batch (its rows do not fold into one matrix) against
  // a b broadcast along the batch.
  const Tensor a = Randn({4, 3, 5}, gen, DType::kFloat64).slice(0, 0, 4, 2);
  const Tensor b = Randn({1, 5, 2}, gen, DType::kFloat64);
  ExpectMatchesTorch("matmul", MatmulFn(false, false), {a, b},
                     TransposeAttrs(false, false));
}

TEST(MatmulTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const MatmulCase& c : Cases()) {
    SCOPED_TRACE(Describe(c));
    ExpectGradientsMatchFiniteDifferences(
        MatmulFn(c.transpose_a, c.transpose_b),
        {Randn(c.a, gen, DType::kFloat64), Randn(c.b, gen, DType::kFloat64)});
  }
}

TEST(MatmulTest, EmptyInnerDimGivesZeros) {
  const Tensor out = Matmul(Ones({2, 0}), Ones({0, 3}));
  EXPECT_EQ(out.shape(), (Shape{2, 3}));
  EXPECT_EQ(out.ToVector(), std::vector<double>(6, 0.0));
}

TEST(MatmulTest, LargeProductMatchesTorch) {
  // Large enough for Eigen's blocked, multi-threaded GEMM.
  Generator gen = TestGenerator();
  ExpectMatchesTorch("matmul", MatmulFn(false, true),
                     {Randn({2, 96, 80}, gen, DType::kFloat64),
                      Randn({2, 72, 80}, gen, DType::kFloat64)},
                     TransposeAttrs(false, true));
  // In float32 each output sums ~80 products of N(0, 1) values: its rounding
  // error, ~6e-8 * sqrt(80) * 9 ~ 5e-6, scales with the terms, not with the
  // (possibly much smaller) result, so the absolute tolerance is 10x that.
  const testing::Tolerance tol = {1e-5, 5e-5};
  ExpectMatchesTorch("matmul", MatmulFn(false, true),
                     {Randn({2, 96, 80}, gen), Randn({2, 72, 80}, gen)},
                     TransposeAttrs(false, true), &tol);
}

TEST(MatmulTest, RejectsMismatchedInnerDims) {
  const absl::Status s = StatusFromCall([] {
    Matmul(Ones({3, 4}), Ones({5, 2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Matmul"), HasSubstr("inner dims"),
                    HasSubstr("[3, 4]"), HasSubstr("[5, 2]")));
}

TEST(MatmulTest, RejectsBatchDimsThatDoNotBroadcast) {
  const absl::Status s = StatusFromCall([] {
    Matmul(Ones({2, 3, 4}), Ones({3, 4, 5}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("Matmul"));
}

TEST(MatmulTest, RejectsMixedDtypes) {
  const absl::Status s = StatusFromCall([] {
    Matmul(Ones({3, 4}), Ones({4, 2}, DType::kFloat64));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("Matmul"), HasSubstr("float64"), HasSubstr("float32")));
}

TEST(MatmulTest, RejectsOneDimensionalInputs) {
  const absl::Status s = StatusFromCall([] {
    Matmul(Ones({4}), Ones({4, 2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Matmul"), HasSubstr("at least 2 dims"),
                    HasSubstr("[4]")));
}

}  // namespace
}  // namespace lc
