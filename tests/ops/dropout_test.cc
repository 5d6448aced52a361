#include "ops/dropout.h"

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
using ::lc::testing::OracleAttrs;
using ::lc::testing::StridedLayout;
using ::lc::testing::StridedLayoutName;
using ::lc::testing::TestGenerator;
using ::testing::AllOf;
using ::testing::HasSubstr;

TEST(DropoutTest, SameSeedAndOffsetGiveTheSameMask) {
  Generator values = TestGenerator();
  const Tensor x = Randn({6, 7}, values, DType::kFloat64);
  Generator a(1234), b(1234);
  const Tensor first = Dropout(x, 0.4, /*training=*/true, &a);
  EXPECT_EQ(first.ToVector(), Dropout(x, 0.4, true, &b).ToVector());
  // Each draw takes the next offset, so the next mask differs.
  EXPECT_EQ(a.offset(), 1u);
  EXPECT_NE(first.ToVector(), Dropout(x, 0.4, true, &a).ToVector());
  // Rewinding the offset reproduces the first mask.
  a.set_offset(0);
  EXPECT_EQ(first.ToVector(), Dropout(x, 0.4, true, &a).ToVector());
}

TEST(DropoutTest, ReproducesUniformAtElementByElement) {
  Generator values = TestGenerator();
  // Strided input: element i is the i-th in row-major order, not in memory.
  const Tensor x = NonContiguousCopy(Randn({3, 4, 5}, values, DType::kFloat64));
  const double p = 0.35;
  Generator gen(77);
  gen.set_offset(11);
  const std::vector<double> out = Dropout(x, p, true, &gen).ToVector();
  const std::vector<double> in = x.ToVector();
  for (size_t i = 0; i < in.size(); ++i) {
    const bool keep = UniformAt(77, 11, i) >= p;
    EXPECT_DOUBLE_EQ(out[i], keep ? in[i] / (1 - p) : 0.0) << "element " << i;
  }
}

// Forward and gradient against libtorch computing x * mask / (1 - p) from
// the same Philox draws, for contiguous and strided inputs (the mask follows
// the row-major index, not memory order).
TEST(DropoutTest, MatchesTorch) {
  Generator values = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const Shape& shape : {Shape{7}, Shape{3, 4, 5}}) {
      for (double p : {0.2, 0.5}) {
        SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(shape) + " p " +
                     std::to_string(p));
        const uint64_t seed = 1000 + static_cast<uint64_t>(10 * p);
        const uint64_t offset = shape.size();
        // A fresh generator at the same state per call.
        const auto fn = [&](const Tensors& in) -> Tensors {
          Generator gen(seed);
          gen.set_offset(offset);
          return {Dropout(in[0], p, /*training=*/true, &gen)};
        };
        const OracleAttrs attrs{{{"p", p},
                                 {"seed", static_cast<double>(seed)},
                                 {"offset", static_cast<double>(offset)}},
                                {},
                                {}};
        const Tensor x = Randn(shape, values, dtype);
        ExpectMatchesTorch("dropout", fn, {x}, attrs);
        for (StridedLayout layout : kStridedLayouts) {
          SCOPED_TRACE(StridedLayoutName(layout));
          ExpectMatchesTorch("dropout", fn, {NonContiguousCopy(x, layout)},
                             attrs);
        }
      }
    }
  }
}

TEST(DropoutTest, DropsAFractionNearP) {
  const double p = 0.3;
  const int64_t n = 200000;
  Generator gen(5);
  const std::vector<double> out =
      Dropout(Ones({n}, DType::kFloat64), p, true, &gen).ToVector();
  int64_t dropped = 0;
  for (double v : out) {
    if (v == 0) {
      ++dropped;
    } else {
      EXPECT_DOUBLE_EQ(v, 1 / (1 - p));
    }
  }
  // The dropped fraction has standard deviation sqrt(p (1 - p) / n) ~ 0.001;
  // 0.006 is about six of them.
  EXPECT_NEAR(static_cast<double>(dropped) / n, p, 0.006);
}

TEST(DropoutTest, GradientIsMaskTimesScale) {
  Generator values = TestGenerator();
  const double p = 0.5;
  const Tensor x =
      Randn({4, 6}, values, DType::kFloat64).set_requires_grad(true);
  const Tensor g = Randn({4, 6}, values, DType::kFloat64);
  Generator gen(9);
  Dropout(x, p, true, &gen).backward(g);
  const std::vector<double> grad = x.grad().ToVector();
  const std::vector<double> gv = g.ToVector();
  for (size_t i = 0; i < gv.size(); ++i) {
    const double mask = UniformAt(9, 0, i) >= p ? 1.0 : 0.0;
    EXPECT_DOUBLE_EQ(grad[i], gv[i] * mask / (1 - p)) << "element " << i;
  }
}

TEST(DropoutTest, GradientsMatchFiniteDifferences) {
  Generator values = TestGenerator();
  // A fresh generator per call: every evaluation draws the same mask.
  ExpectGradientsMatchFiniteDifferences(
      [](const Tensors& in) {
        Generator gen(21);
        return Tensors{Dropout(in[0], 0.25, true, &gen)};
      },
      {Randn({5, 6}, values, DType::kFloat64)});
}

TEST(DropoutTest, IdentityWhenNotTrainingOrPIsZero) {
  Generator values = TestGenerator();
  const Tensor x = Randn({3, 3}, values);
  Generator gen(3);
  EXPECT_EQ(Dropout(x, 0.5, /*training=*/false, &gen).impl_ptr(), x.impl_ptr());
  EXPECT_EQ(Dropout(x, 0.0, /*training=*/true, &gen).impl_ptr(), x.impl_ptr());
  EXPECT_EQ(gen.offset(), 0u);
}

TEST(DropoutTest, UsesTheDefaultGeneratorWhenNoneIsGiven) {
  Generator values = TestGenerator();
  const Tensor x = Randn({4, 4}, values);
  DefaultGenerator() = Generator(99);
  const Tensor out = Dropout(x, 0.5, true);
  EXPECT_EQ(DefaultGenerator().offset(), 1u);
  Generator same(99);
  EXPECT_EQ(out.ToVector(), Dropout(x, 0.5, true, &same).ToVector());
}

TEST(DropoutTest, BFloat16KeepsItsDtypeAndMask) {
  Generator values = TestGenerator();
  const Tensor x = Randn({4, 8}, values, DType::kBFloat16);
  Generator a(8), b(8);
  const Tensor out = Dropout(x, 0.5, true, &a);
  EXPECT_EQ(out.dtype(), DType::kBFloat16);
  // Scaling by 2 is exact in bfloat16.
  EXPECT_EQ(out.ToVector(),
            Dropout(x.to(DType::kFloat32), 0.5, true, &b).ToVector());
}

TEST(DropoutTest, RejectsPOutsideZeroToOne) {
  for (double p : {1.0, -0.1, 1.5}) {
    const absl::Status s =
        StatusFromCall([p] { Dropout(Ones({2}), p, /*training=*/true); });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << p;
    EXPECT_THAT(std::string(s.message()),
                AllOf(HasSubstr("Dropout"), HasSubstr("0 <= p < 1")));
  }
  const absl::Status s = StatusFromCall([] { nn::Dropout module(1.0); });
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("nn::Dropout"), HasSubstr("p = 1")));
}

TEST(DropoutModuleTest, DropsOnlyWhileTraining) {
  DefaultGenerator() = Generator(4);
  const Tensor x = Ones({64});
  nn::Dropout dropout(0.5);
  EXPECT_TRUE(dropout.Parameters().empty());
  const std::vector<double> trained = dropout.Forward(x).ToVector();
  EXPECT_NE(trained, x.ToVector());
  for (double v : trained) EXPECT_TRUE(v == 0 || v == 2) << v;
  dropout.Eval();
  EXPECT_EQ(dropout.Forward(x).impl_ptr(), x.impl_ptr());
}

}  // namespace
}  // namespace lc
