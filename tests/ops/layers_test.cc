// The small layers: the Linear op against torch, and the Linear, LayerNorm,
// RMSNorm and Embedding modules (parameters, initialization, forward).
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/embedding.h"
#include "ops/linear.h"
#include "ops/norm.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::lc::testing::ExpectGradientsMatchFiniteDifferences;
using ::lc::testing::ExpectMatchesTorch;
using ::lc::testing::kStridedLayouts;
using ::lc::testing::NonContiguousCopy;
using ::lc::testing::StridedLayout;
using ::lc::testing::StridedLayoutName;
using ::lc::testing::TestGenerator;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Inputs: x, weight, bias (may be undefined).
Tensors LinearOp(const Tensors& in) { return {Linear(in[0], in[1], in[2])}; }

std::vector<std::string> ParameterNames(const Module& module) {
  std::vector<std::string> names;
  for (const auto& [name, tensor] : module.NamedParameters()) {
    names.push_back(name);
  }
  return names;
}

struct Moments {
  double min, max, mean, variance;
};

Moments MomentsOf(const Tensor& t) {
  const std::vector<double> v = t.ToVector();
  Moments m{v[0], v[0], 0, 0};
  for (double x : v) {
    m.min = std::min(m.min, x);
    m.max = std::max(m.max, x);
    m.mean += x / v.size();
  }
  for (double x : v) m.variance += (x - m.mean) * (x - m.mean) / v.size();
  return m;
}

// ---- Linear op ----

const std::vector<std::pair<Shape, Shape>>& LinearShapes() {
  // x shape, weight shape.
  static const auto* shapes =
      new std::vector<std::pair<Shape, Shape>>{{{2, 3, 4}, {5, 4}},
                                               {{3, 4}, {2, 4}},
                                               {{4}, {3, 4}},
                                               {{2, 1, 2, 3}, {1, 3}}};
  return *shapes;
}

TEST(LinearTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    for (const auto& [x_shape, w_shape] : LinearShapes()) {
      SCOPED_TRACE(DTypeName(dtype) + " x " + ShapeToString(x_shape) +
                   " weight " + ShapeToString(w_shape));
      const Tensor x = Randn(x_shape, gen, dtype);
      const Tensor w = Randn(w_shape, gen, dtype);
      const Tensor b = Randn({w_shape[0]}, gen, dtype);
      ExpectMatchesTorch("linear", LinearOp, {x, w, b});
      ExpectMatchesTorch("linear", LinearOp, {x, w, Tensor()});
      if (dtype == DType::kBFloat16) continue;
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch(
            "linear", LinearOp,
            {NonContiguousCopy(x, layout), NonContiguousCopy(w, layout),
             NonContiguousCopy(b, layout)});
      }
    }
  }
}

TEST(LinearTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const auto& [x_shape, w_shape] : LinearShapes()) {
    SCOPED_TRACE(ShapeToString(x_shape));
    ExpectGradientsMatchFiniteDifferences(
        LinearOp, {Randn(x_shape, gen, DType::kFloat64),
                   Randn(w_shape, gen, DType::kFloat64),
                   Randn({w_shape[0]}, gen, DType::kFloat64)});
  }
}

TEST(LinearTest, RejectsInputOfWrongWidth) {
  const absl::Status s = StatusFromCall([] {
    Linear(Ones({2, 3}), Ones({5, 4}), Tensor());
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Linear"), HasSubstr("[2, 3]"),
                    HasSubstr("[5, 4]"), HasSubstr("[..., 4]")));
}

TEST(LinearTest, RejectsBiasOfWrongShape) {
  const absl::Status s = StatusFromCall([] {
    Linear(Ones({2, 4}), Ones({5, 4}), Ones({4}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Linear"), HasSubstr("bias"), HasSubstr("[5]")));
}

TEST(LinearTest, RejectsMixedDtypes) {
  const absl::Status s = StatusFromCall([] {
    Linear(Ones({2, 4}), Ones({5, 4}, DType::kFloat64), Tensor());
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Linear"), HasSubstr("float64")));
}

// ---- Modules ----

TEST(LinearModuleTest, HasTorchShapesNamesAndInitRange) {
  Generator gen = TestGenerator();
  const int64_t in = 64;
  nn::Linear linear(in, 48, /*bias=*/true, gen);
  EXPECT_THAT(ParameterNames(linear), ElementsAre("weight", "bias"));
  EXPECT_EQ(linear.weight().shape(), (Shape{48, 64}));
  EXPECT_EQ(linear.bias().shape(), (Shape{48}));
  EXPECT_TRUE(linear.weight().requires_grad());
  // U(-1/8, 1/8): inside the bound, reaching close to both ends, with mean 0
  // and variance bound^2 / 3. The sample of 3072 has a mean with standard
  // deviation 0.0013 and a variance with relative standard deviation 0.016,
  // so 0.006 and 10% are about five and six of them.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  const Moments w = MomentsOf(linear.weight());
  EXPECT_GE(w.min, -bound);
  EXPECT_LE(w.max, bound);
  EXPECT_LT(w.min, -0.98 * bound);
  EXPECT_GT(w.max, 0.98 * bound);
  EXPECT_NEAR(w.mean, 0, 0.006);
  EXPECT_NEAR(w.variance, bound * bound / 3, 0.1 * bound * bound / 3);
  const Moments b = MomentsOf(linear.bias());
  EXPECT_GE(b.min, -bound);
  EXPECT_LE(b.max, bound);
  EXPECT_LT(b.min, -0.5 * bound);
  EXPECT_GT(b.max, 0.5 * bound);
}

TEST(LinearModuleTest, ForwardEqualsTheFunctionalOp) {
  Generator gen = TestGenerator();
  nn::Linear linear(4, 3, /*bias=*/true, gen);
  const Tensor x = Randn({2, 5, 4}, gen);
  EXPECT_EQ(linear.Forward(x).ToVector(),
            Linear(x, linear.weight(), linear.bias()).ToVector());
}

TEST(LinearModuleTest, WithoutBiasAndInBFloat16) {
  Generator gen = TestGenerator();
  nn::Linear linear(4, 3, /*bias=*/false, gen, DType::kBFloat16);
  EXPECT_THAT(ParameterNames(linear), ElementsAre("weight"));
  EXPECT_FALSE(linear.bias().defined());
  EXPECT_EQ(linear.weight().dtype(), DType::kBFloat16);
  const Tensor x = Randn({2, 4}, gen, DType::kBFloat16);
  const Tensor y = linear.Forward(x);
  EXPECT_EQ(y.dtype(), DType::kBFloat16);
  EXPECT_EQ(y.ToVector(), Linear(x, linear.weight(), Tensor()).ToVector());
}

TEST(LinearModuleTest, SameSeedSameInit) {
  Generator a(3), b(3);
  EXPECT_EQ(nn::Linear(5, 2, true, a).weight().ToVector(),
            nn::Linear(5, 2, true, b).weight().ToVector());
}

TEST(LayerNormModuleTest, InitializesToIdentityScaleAndZeroShift) {
  Generator gen = TestGenerator();
  nn::LayerNorm norm(6, /*eps=*/1e-3);
  EXPECT_THAT(ParameterNames(norm), ElementsAre("weight", "bias"));
  EXPECT_EQ(norm.weight().ToVector(), std::vector<double>(6, 1.0));
  EXPECT_EQ(norm.bias().ToVector(), std::vector<double>(6, 0.0));
  EXPECT_EQ(norm.eps(), 1e-3);
  const Tensor x = Randn({3, 6}, gen);
  EXPECT_EQ(norm.Forward(x).ToVector(),
            LayerNorm(x, norm.weight(), norm.bias(), 1e-3).ToVector());
  nn::LayerNorm no_bias(6, 1e-5, /*bias=*/false, DType::kFloat64);
  EXPECT_THAT(ParameterNames(no_bias), ElementsAre("weight"));
  EXPECT_EQ(no_bias.weight().dtype(), DType::kFloat64);
}

TEST(RMSNormModuleTest, InitializesToIdentityScale) {
  Generator gen = TestGenerator();
  nn::RMSNorm norm(5, /*eps=*/1e-4);
  EXPECT_THAT(ParameterNames(norm), ElementsAre("weight"));
  EXPECT_EQ(norm.weight().ToVector(), std::vector<double>(5, 1.0));
  const Tensor x = Randn({2, 3, 5}, gen);
  EXPECT_EQ(norm.Forward(x).ToVector(),
            RmsNorm(x, norm.weight(), 1e-4).ToVector());
}

TEST(EmbeddingModuleTest, InitializesStandardNormalAndLooksUpRows) {
  Generator gen = TestGenerator();
  nn::Embedding embedding(1000, 8, gen);
  EXPECT_THAT(ParameterNames(embedding), ElementsAre("weight"));
  EXPECT_EQ(embedding.weight().shape(), (Shape{1000, 8}));
  // N(0, 1) over 8000 draws: the mean has standard deviation 0.011 and the
  // variance 0.016, so 0.06 and 0.08 are about five of them.
  const Moments m = MomentsOf(embedding.weight());
  EXPECT_NEAR(m.mean, 0, 0.06);
  EXPECT_NEAR(m.variance, 1, 0.08);
  const Tensor ids = FromVector({7, 999, 7}, {3}, DType::kInt64);
  EXPECT_EQ(embedding.Forward(ids).ToVector(),
            Embedding(embedding.weight(), ids).ToVector());
  EXPECT_EQ(embedding.Forward(ids).shape(), (Shape{3, 8}));
}

TEST(LayerModulesTest, RejectNonPositiveSizes) {
  Generator gen = TestGenerator();
  EXPECT_THAT(std::string(StatusFromCall([&] {
                            nn::Linear(0, 3, true, gen);
                          }).message()),
              AllOf(HasSubstr("nn::Linear"), HasSubstr("in = 0")));
  EXPECT_THAT(std::string(StatusFromCall([] { nn::LayerNorm(-1); }).message()),
              HasSubstr("nn::LayerNorm: dim = -1"));
  EXPECT_THAT(std::string(StatusFromCall([] { nn::RMSNorm(0); }).message()),
              HasSubstr("nn::RMSNorm: dim = 0"));
  EXPECT_THAT(
      std::string(StatusFromCall([&] { nn::Embedding(10, 0, gen); }).message()),
      AllOf(HasSubstr("nn::Embedding"), HasSubstr("dim = 0")));
}

}  // namespace
}  // namespace lc
