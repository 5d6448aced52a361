#include "ops/activation.h"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/random.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::ExpectError;
using testing::ExpectGradientsMatchFiniteDifferences;
using testing::ExpectMatchesTorch;
using testing::kStridedLayouts;
using testing::NonContiguousCopy;
using testing::OracleAttrs;
using testing::StridedLayout;
using testing::StridedLayoutName;
using testing::TestGenerator;

struct ActivationCase {
  std::string name;  // for traces
  std::string torch_op;
  OracleAttrs attrs;
  std::function<Tensor(const Tensor&)> fn;
};

std::vector<ActivationCase> ActivationCases() {
  return {
      {"relu", "relu", {}, [](const Tensor& x) { return Relu(x); }},
      {"silu", "silu", {}, [](const Tensor& x) { return Silu(x); }},
      {"gelu",
       "gelu",
       {{}, {}, {{"approximate", "none"}}},
       [](const Tensor& x) { return Gelu(x); }},
      {"gelu_tanh",
       "gelu",
       {{}, {}, {{"approximate", "tanh"}}},
       [](const Tensor& x) { return Gelu(x, GeluApproximation::kTanh); }},
  };
}

TEST(ActivationTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (const ActivationCase& op : ActivationCases()) {
    const auto fn = [&](const Tensors& in) -> Tensors {
      return {op.fn(in[0])};
    };
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      SCOPED_TRACE(op.name + " " + DTypeName(dtype));
      for (const Shape& shape : {Shape{9}, Shape{2, 3, 5}, Shape{}}) {
        // Scaled by 3 so that the tails of GELU and SiLU are exercised.
        ExpectMatchesTorch(op.torch_op, fn, {Randn(shape, gen, dtype) * 3.0},
                           op.attrs);
      }
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch(
            op.torch_op, fn,
            {NonContiguousCopy(Randn({4, 3}, gen, dtype), layout)}, op.attrs);
      }
    }
  }
}

TEST(ActivationTest, MatchesTorchInBFloat16) {
  Generator gen = TestGenerator();
  for (const ActivationCase& op : ActivationCases()) {
    SCOPED_TRACE(op.name);
    const Tensor x = Randn({3, 7}, gen, DType::kBFloat16);
    EXPECT_EQ(op.fn(x).dtype(), DType::kBFloat16);
    ExpectMatchesTorch(
        op.torch_op,
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0])}; }, {x},
        op.attrs);
  }
}

TEST(ActivationTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const ActivationCase& op : ActivationCases()) {
    SCOPED_TRACE(op.name);
    // Normal draws are never within the step (1e-6) of ReLU's kink at 0 in
    // practice: the chance is ~1e-6 per element.
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0])}; },
        {NonContiguousCopy(Randn({4, 5}, gen, DType::kFloat64) * 2.0)});
  }
}

TEST(ActivationTest, ReluKeepsNaNAndHasZeroGradientAtZero) {
  Tensor x = FromVector({-1, 0, 2, NAN}, {4}, DType::kFloat64);
  x.set_requires_grad(true);
  const Tensor y = Relu(x);
  const std::vector<double> values = y.ToVector();
  EXPECT_EQ(values[0], 0);
  EXPECT_EQ(values[1], 0);
  EXPECT_EQ(values[2], 2);
  EXPECT_TRUE(std::isnan(values[3]));
  y.backward(FromVector({1, 1, 1, 0}, {4}, DType::kFloat64));
  const std::vector<double> grad = x.grad().ToVector();
  EXPECT_EQ(grad[0], 0);
  EXPECT_EQ(grad[1], 0);
  EXPECT_EQ(grad[2], 1);
}

TEST(ActivationTest, BadInputsAreRejected) {
  ExpectError([] { Relu(Zeros({2}, DType::kInt64)); }, {"Relu", "int64"});
  ExpectError([] { Silu(Zeros({2}, DType::kUInt8)); }, {"Silu", "uint8"});
  ExpectError([] { Gelu(Tensor()); }, {"Gelu", "undefined"});
}

}  // namespace
}  // namespace lc
