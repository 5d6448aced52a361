#include "ops/norm.h"

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

OracleAttrs EpsAttrs(double eps) {
  OracleAttrs attrs;
  attrs.numbers["eps"] = eps;
  return attrs;
}

// Inputs: x, weight, bias (weight and bias may be undefined).
OpFn LayerNormFn(double eps) {
  return [=](const Tensors& in) {
    return Tensors{LayerNorm(in[0], in[1], in[2], eps)};
  };
}

// Inputs: x, weight (may be undefined).
OpFn RmsNormFn(double eps) {
  return [=](const Tensors& in) { return Tensors{RmsNorm(in[0], in[1], eps)}; };
}

// Rows with a nonzero mean and a scale away from 1, so that centering and
// scaling both matter.
Tensor RandomRows(const Shape& shape, Generator& gen, DType dtype) {
  std::vector<double> values = Randn(shape, gen, DType::kFloat64).ToVector();
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = 3 * values[i] + 0.5 * static_cast<double>(i % 5);
  }
  return FromVector(values, shape, dtype);
}

const std::vector<Shape>& Shapes() {
  static const auto* shapes =
      new std::vector<Shape>{{4, 8}, {2, 3, 5}, {6}, {3, 1, 2}, {2, 2, 2, 16}};
  return *shapes;
}

TEST(LayerNormTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    for (const Shape& shape : Shapes()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(shape));
      const Shape param = {shape.back()};
      const Tensor x = RandomRows(shape, gen, dtype);
      const Tensor w = Randn(param, gen, dtype);
      const Tensor b = Randn(param, gen, dtype);
      ExpectMatchesTorch("layer_norm", LayerNormFn(1e-5), {x, w, b},
                         EpsAttrs(1e-5));
      ExpectMatchesTorch("layer_norm", LayerNormFn(1e-3), {x, w, Tensor()},
                         EpsAttrs(1e-3));
      ExpectMatchesTorch("layer_norm", LayerNormFn(1e-5),
                         {x, Tensor(), Tensor()}, EpsAttrs(1e-5));
    }
  }
}

TEST(LayerNormTest, MatchesTorchOnNonContiguousInputs) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const Shape& shape : Shapes()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(shape));
      const Shape param = {shape.back()};
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch(
            "layer_norm", LayerNormFn(1e-5),
            {NonContiguousCopy(RandomRows(shape, gen, dtype), layout),
             NonContiguousCopy(Randn(param, gen, dtype), layout),
             NonContiguousCopy(Randn(param, gen, dtype), layout)},
            EpsAttrs(1e-5));
      }
    }
  }
}

TEST(LayerNormTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  const DType f64 = DType::kFloat64;
  ExpectGradientsMatchFiniteDifferences(
      LayerNormFn(1e-5), {RandomRows({3, 5}, gen, f64), Randn({5}, gen, f64),
                          Randn({5}, gen, f64)});
  ExpectGradientsMatchFiniteDifferences(
      LayerNormFn(1e-5), {RandomRows({2, 2, 6}, gen, f64), Tensor(), Tensor()});
}

TEST(LayerNormTest, RejectsWeightOfWrongShape) {
  const absl::Status s = StatusFromCall([] {
    LayerNorm(Ones({2, 4}), Ones({5}), Zeros({4}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("LayerNorm"), HasSubstr("weight"),
                    HasSubstr("[5]"), HasSubstr("[4]")));
}

TEST(LayerNormTest, RejectsBiasOfWrongShape) {
  const absl::Status s = StatusFromCall([] {
    LayerNorm(Ones({2, 4}), Ones({4}), Zeros({2, 4}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("bias"), HasSubstr("[2, 4]")));
}

TEST(LayerNormTest, RejectsMixedDtypes) {
  const absl::Status s = StatusFromCall([] {
    LayerNorm(Ones({2, 4}), Ones({4}, DType::kFloat64), Zeros({4}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("LayerNorm"), HasSubstr("float64")));
}

TEST(RmsNormTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const Shape& shape : Shapes()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(shape));
      const Tensor x = RandomRows(shape, gen, dtype);
      ExpectMatchesTorch("rms_norm", RmsNormFn(1e-6),
                         {x, Randn({shape.back()}, gen, dtype)},
                         EpsAttrs(1e-6));
      ExpectMatchesTorch("rms_norm", RmsNormFn(0.1), {x, Tensor()},
                         EpsAttrs(0.1));
    }
  }
}

TEST(RmsNormTest, MatchesTorchOnNonContiguousInputs) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const Shape& shape : Shapes()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(shape));
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch(
            "rms_norm", RmsNormFn(1e-6),
            {NonContiguousCopy(RandomRows(shape, gen, dtype), layout),
             NonContiguousCopy(Randn({shape.back()}, gen, dtype), layout)},
            EpsAttrs(1e-6));
      }
    }
  }
}

TEST(RmsNormTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  const DType f64 = DType::kFloat64;
  ExpectGradientsMatchFiniteDifferences(
      RmsNormFn(1e-6), {RandomRows({2, 2, 4}, gen, f64), Randn({4}, gen, f64)});
  ExpectGradientsMatchFiniteDifferences(
      RmsNormFn(1e-6), {RandomRows({3, 7}, gen, f64), Tensor()});
}

TEST(RmsNormTest, RejectsWeightOfWrongShape) {
  const absl::Status s = StatusFromCall([] {
    RmsNorm(Ones({3, 6}), Ones({3}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("RmsNorm"), HasSubstr("weight"), HasSubstr("[3]"),
                    HasSubstr("[6]")));
}

TEST(RmsNormTest, RejectsMixedDtypes) {
  const absl::Status s = StatusFromCall([] {
    RmsNorm(Ones({3, 6}, DType::kFloat64), Ones({6}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("RmsNorm"), HasSubstr("float32")));
}

}  // namespace
}  // namespace lc
