#include "ops/rope.h"

#include <string>
#include <vector>

#include "core/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::lc::testing::ExpectAllClose;
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

OpFn RotaryFn(double base) {
  return [=](const Tensors& in) {
    return Tensors{ApplyRotary(in[0], in[1], base)};
  };
}

OracleAttrs BaseAttrs(double base) {
  OracleAttrs attrs;
  attrs.numbers["base"] = base;
  return attrs;
}

Tensor Positions(const std::vector<double>& values) {
  return FromVector(values, {static_cast<int64_t>(values.size())},
                    DType::kInt64);
}

struct RotaryCase {
  Shape x;  // [batch, n, heads, head_dim]
  Tensor positions;
  double base;
};

// Positions from 0, global positions of a later chunk (as a ring rank
// passes), an arbitrary order, and the smallest head_dim.
std::vector<RotaryCase> Cases() {
  return {
      {{1, 4, 2, 8}, Positions({0, 1, 2, 3}), 10000.0},
      {{2, 3, 3, 6}, Positions({4096, 4097, 4098}), 10000.0},
      {{2, 5, 1, 4}, Positions({7, 3, 0, 12, 3}), 500.0},
      {{1, 2, 4, 2}, Positions({1, 100}), 10000.0},
  };
}

TEST(RotaryTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const RotaryCase& c : Cases()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(c.x));
      const Tensor x = Randn(c.x, gen, dtype);
      ExpectMatchesTorch("rope", RotaryFn(c.base), {x, c.positions},
                         BaseAttrs(c.base));
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("rope", RotaryFn(c.base),
                           {NonContiguousCopy(x, layout), c.positions},
                           BaseAttrs(c.base));
      }
      // [batch, heads, n, head_dim] memory seen as [batch, n, heads, ...].
      const Shape heads_first = {c.x[0], c.x[2], c.x[1], c.x[3]};
      ExpectMatchesTorch(
          "rope", RotaryFn(c.base),
          {Randn(heads_first, gen, dtype).transpose(1, 2), c.positions},
          BaseAttrs(c.base));
    }
  }
}

TEST(RotaryTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const RotaryCase& c : Cases()) {
    SCOPED_TRACE(ShapeToString(c.x));
    // Batch 1 keeps every input at 64 elements or fewer.
    Shape small = c.x;
    small[0] = 1;
    ExpectGradientsMatchFiniteDifferences(
        RotaryFn(c.base), {Randn(small, gen, DType::kFloat64), c.positions});
  }
}

TEST(RotaryTest, KeepsNormsAndDependsOnlyOnRelativePosition) {
  // A rotation keeps each pair's norm, and <R(p)q, R(p')k> depends only on
  // p - p': shifting both positions by 1000 leaves the product unchanged.
  Generator gen = TestGenerator();
  const Tensor q = Randn({1, 2, 1, 8}, gen, DType::kFloat64);
  const Tensor k = Randn({1, 2, 1, 8}, gen, DType::kFloat64);
  auto dot = [](const Tensor& a, const Tensor& b) {
    const std::vector<double> av = a.ToVector();
    const std::vector<double> bv = b.ToVector();
    double total = 0;
    for (size_t i = 0; i < av.size(); ++i) total += av[i] * bv[i];
    return total;
  };
  const Tensor q0 = ApplyRotary(q, Positions({3, 9}));
  const Tensor k0 = ApplyRotary(k, Positions({5, 2}));
  const Tensor q1 = ApplyRotary(q, Positions({1003, 1009}));
  const Tensor k1 = ApplyRotary(k, Positions({1005, 1002}));
  // float64 throughout: the norms differ by rounding only (~1e-15 on values
  // of ~10), and angles near 1000 carry ~1e-13 of absolute error.
  EXPECT_NEAR(dot(q0, q0), dot(q, q), 1e-12);
  EXPECT_NEAR(dot(q0, k0), dot(q1, k1), 1e-9);
  // The inverse rotation (the backward) undoes the forward.
  const Tensor x =
      Randn({1, 2, 1, 8}, gen, DType::kFloat64).set_requires_grad(true);
  const Tensor y = ApplyRotary(x, Positions({3, 9}));
  y.backward(y.detach());
  // Two float64 rotations: a few ulps of error.
  ExpectAllClose(x.grad(), x.detach(), {1e-12, 1e-12}, "R(-p) R(p) x");
}

TEST(RotaryTest, RejectsOddHeadDim) {
  const absl::Status s = StatusFromCall([] {
    ApplyRotary(Zeros({1, 2, 1, 5}), Positions({0, 1}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("ApplyRotary"), HasSubstr("head_dim = 5"),
                    HasSubstr("even")));
}

TEST(RotaryTest, RejectsPositionsOfWrongLength) {
  const absl::Status s = StatusFromCall([] {
    ApplyRotary(Zeros({1, 3, 1, 4}), Positions({0, 1}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("positions"), HasSubstr("[2]"), HasSubstr("[3]")));
}

TEST(RotaryTest, RejectsNonIntegerPositions) {
  const absl::Status s = StatusFromCall([] {
    ApplyRotary(Zeros({1, 2, 1, 4}), FromVector({0, 1}, {2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("positions"), HasSubstr("int64")));
}

TEST(RotaryTest, RejectsInputThatIsNot4D) {
  const absl::Status s = StatusFromCall([] {
    ApplyRotary(Zeros({2, 1, 4}), Positions({0, 1}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("ApplyRotary"), HasSubstr("[2, 1, 4]"),
                    HasSubstr("4-D")));
}

}  // namespace
}  // namespace lc
