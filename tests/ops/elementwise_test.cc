#include "ops/elementwise.h"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/reduce.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::DefaultTolerance;
using testing::ExpectAllClose;
using testing::ExpectError;
using testing::ExpectGradientsMatchFiniteDifferences;
using testing::ExpectMatchesTorch;
using testing::kStridedLayouts;
using testing::NonContiguousCopy;
using testing::OracleAttrs;
using testing::StridedLayout;
using testing::StridedLayoutName;
using testing::TestGenerator;

// Fresh random values of `shape`: standard normal, or uniform in [0.5, 1.5)
// when `positive` (the domain of log, sqrt and rsqrt; divisors away from 0).
Tensor RandomInput(const Shape& shape, Generator& gen, DType dtype,
                   bool positive) {
  return positive ? AddScalar(Rand(shape, gen, dtype), 0.5)
                  : Randn(shape, gen, dtype);
}

struct BinaryCase {
  std::string torch_op;
  std::function<Tensor(const Tensor&, const Tensor&)> fn;
  bool positive_b;  // b is a divisor
};

std::vector<BinaryCase> BinaryCases() {
  return {{"add", Add, false},
          {"sub", Sub, false},
          {"mul", Mul, false},
          {"div", Div, true}};
}

// Pairs of shapes that broadcast, from equal shapes to a scalar operand.
std::vector<std::pair<Shape, Shape>> BroadcastShapePairs() {
  return {{{3, 4}, {3, 4}}, {{2, 3, 4}, {4}}, {{2, 1, 4}, {3, 1}},
          {{5}, {}},        {{1}, {2, 3}},    {{2, 3, 1}, {2, 1, 4}}};
}

TEST(ElementwiseTest, BinaryOpsMatchTorchWithBroadcasting) {
  Generator gen = TestGenerator();
  for (const BinaryCase& op : BinaryCases()) {
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      for (const auto& [shape_a, shape_b] : BroadcastShapePairs()) {
        SCOPED_TRACE(op.torch_op + " " + DTypeName(dtype) + " " +
                     ShapeToString(shape_a) + " " + ShapeToString(shape_b));
        ExpectMatchesTorch(
            op.torch_op,
            [&](const Tensors& in) -> Tensors { return {op.fn(in[0], in[1])}; },
            {RandomInput(shape_a, gen, dtype, false),
             RandomInput(shape_b, gen, dtype, op.positive_b)});
      }
    }
  }
}

TEST(ElementwiseTest, BinaryOpsMatchTorchOnNonContiguousInputs) {
  Generator gen = TestGenerator();
  for (const BinaryCase& op : BinaryCases()) {
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      SCOPED_TRACE(op.torch_op + " " + DTypeName(dtype));
      const auto fn = [&](const Tensors& in) -> Tensors {
        return {op.fn(in[0], in[1])};
      };
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        const Tensor a =
            NonContiguousCopy(RandomInput({3, 5}, gen, dtype, false), layout);
        const Tensor b = NonContiguousCopy(
            RandomInput({3, 5}, gen, dtype, op.positive_b), layout);
        ExpectMatchesTorch(op.torch_op, fn, {a, b});
        // Strided and broadcast at once.
        const Tensor row = NonContiguousCopy(
            RandomInput({1, 5}, gen, dtype, op.positive_b), layout);
        ExpectMatchesTorch(op.torch_op, fn, {a, row});
      }
    }
  }
}

TEST(ElementwiseTest, BinaryOpsMatchTorchInBFloat16) {
  Generator gen = TestGenerator();
  for (const BinaryCase& op : BinaryCases()) {
    SCOPED_TRACE(op.torch_op);
    const Tensor a = RandomInput({2, 3, 4}, gen, DType::kBFloat16, false);
    const Tensor b = RandomInput({3, 1}, gen, DType::kBFloat16, op.positive_b);
    EXPECT_EQ(op.fn(a, b).dtype(), DType::kBFloat16);
    ExpectMatchesTorch(
        op.torch_op,
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0], in[1])}; },
        {a, b});
  }
}

TEST(ElementwiseTest, BinaryOpGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const BinaryCase& op : BinaryCases()) {
    for (const auto& [shape_a, shape_b] : BroadcastShapePairs()) {
      SCOPED_TRACE(op.torch_op + " " + ShapeToString(shape_a) + " " +
                   ShapeToString(shape_b));
      ExpectGradientsMatchFiniteDifferences(
          [&](const Tensors& in) -> Tensors { return {op.fn(in[0], in[1])}; },
          {RandomInput(shape_a, gen, DType::kFloat64, false),
           RandomInput(shape_b, gen, DType::kFloat64, op.positive_b)});
    }
  }
}

TEST(ElementwiseTest, SameTensorOnBothSidesAccumulatesItsGradient) {
  Generator gen = TestGenerator();
  // d(x * x)/dx = 2x and d(x / x)/dx = 0 only if both paths are summed.
  ExpectGradientsMatchFiniteDifferences(
      [](const Tensors& in) -> Tensors { return {Mul(in[0], in[0])}; },
      {Randn({3, 4}, gen, DType::kFloat64)});
  ExpectGradientsMatchFiniteDifferences(
      [](const Tensors& in) -> Tensors { return {Div(in[0], in[0])}; },
      {RandomInput({3, 4}, gen, DType::kFloat64, true)});
}

TEST(ElementwiseTest, OnlyInputsThatRequireGradGetOne) {
  Generator gen = TestGenerator();
  Tensor a = Randn({2, 3}, gen, DType::kFloat64);
  a.set_requires_grad(true);
  const Tensor b = Randn({3}, gen, DType::kFloat64);
  Sum(Mul(a, b)).backward();
  EXPECT_FALSE(b.grad().defined());
  ExpectAllClose(a.grad(), Mul(Ones({2, 3}, DType::kFloat64), b),
                 DefaultTolerance(DType::kFloat64), "grad of a");
}

struct ScalarCase {
  std::string torch_op;
  std::string attr;
  double value;
  std::function<Tensor(const Tensor&, double)> fn;
  bool positive;  // the input must be positive (fractional powers)
};

std::vector<ScalarCase> ScalarCases() {
  return {{"add_scalar", "scalar", 1.5, AddScalar, false},
          {"mul_scalar", "scalar", -2.5, MulScalar, false},
          {"pow_scalar", "exponent", 2, PowScalar, false},
          {"pow_scalar", "exponent", 3, PowScalar, false},
          {"pow_scalar", "exponent", 0, PowScalar, false},
          {"pow_scalar", "exponent", 0.5, PowScalar, true},
          {"pow_scalar", "exponent", -1.5, PowScalar, true}};
}

TEST(ElementwiseTest, ScalarOpsMatchTorch) {
  Generator gen = TestGenerator();
  for (const ScalarCase& op : ScalarCases()) {
    const OracleAttrs attrs{{{op.attr, op.value}}, {}, {}};
    const auto fn = [&](const Tensors& in) -> Tensors {
      return {op.fn(in[0], op.value)};
    };
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      SCOPED_TRACE(op.torch_op + " " + std::to_string(op.value) + " " +
                   DTypeName(dtype));
      ExpectMatchesTorch(op.torch_op, fn,
                         {RandomInput({2, 3, 4}, gen, dtype, op.positive)},
                         attrs);
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch(
            op.torch_op, fn,
            {NonContiguousCopy(RandomInput({4, 3}, gen, dtype, op.positive),
                               layout)},
            attrs);
      }
      ExpectMatchesTorch(op.torch_op, fn,
                         {RandomInput({}, gen, dtype, op.positive)}, attrs);
    }
  }
}

TEST(ElementwiseTest, ScalarOpsMatchTorchInBFloat16) {
  Generator gen = TestGenerator();
  for (const ScalarCase& op : ScalarCases()) {
    SCOPED_TRACE(op.torch_op + " " + std::to_string(op.value));
    ExpectMatchesTorch(
        op.torch_op,
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0], op.value)}; },
        {RandomInput({3, 5}, gen, DType::kBFloat16, op.positive)},
        OracleAttrs{{{op.attr, op.value}}, {}, {}});
  }
}

TEST(ElementwiseTest, ScalarOpGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const ScalarCase& op : ScalarCases()) {
    SCOPED_TRACE(op.torch_op + " " + std::to_string(op.value));
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0], op.value)}; },
        {RandomInput({3, 4}, gen, DType::kFloat64, op.positive)});
  }
}

TEST(ElementwiseTest, PowScalarZeroHasZeroGradientAtZero) {
  // x^0 = 1 everywhere, so its gradient is 0 even at x = 0 (not 0 * 0^-1).
  Tensor x = Zeros({3}, DType::kFloat64);
  x.set_requires_grad(true);
  Sum(PowScalar(x, 0)).backward();
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{0, 0, 0}));
}

struct UnaryCase {
  std::string torch_op;
  std::function<Tensor(const Tensor&)> fn;
  bool positive;  // the op's domain is x > 0
};

std::vector<UnaryCase> UnaryCases() {
  return {{"neg", Neg, false},      {"exp", Exp, false},
          {"log", Log, true},       {"sqrt", Sqrt, true},
          {"rsqrt", Rsqrt, true},   {"tanh", Tanh, false},
          {"square", Square, false}};
}

TEST(ElementwiseTest, UnaryOpsMatchTorch) {
  Generator gen = TestGenerator();
  for (const UnaryCase& op : UnaryCases()) {
    const auto fn = [&](const Tensors& in) -> Tensors {
      return {op.fn(in[0])};
    };
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      SCOPED_TRACE(op.torch_op + " " + DTypeName(dtype));
      for (const Shape& shape : {Shape{7}, Shape{2, 3, 4}, Shape{}}) {
        ExpectMatchesTorch(op.torch_op, fn,
                           {RandomInput(shape, gen, dtype, op.positive)});
      }
      ExpectMatchesTorch(
          op.torch_op, fn,
          {NonContiguousCopy(RandomInput({4, 3}, gen, dtype, op.positive))});
    }
  }
}

TEST(ElementwiseTest, UnaryOpsMatchTorchInBFloat16) {
  Generator gen = TestGenerator();
  for (const UnaryCase& op : UnaryCases()) {
    SCOPED_TRACE(op.torch_op);
    const Tensor x = RandomInput({3, 5}, gen, DType::kBFloat16, op.positive);
    EXPECT_EQ(op.fn(x).dtype(), DType::kBFloat16);
    ExpectMatchesTorch(
        op.torch_op,
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0])}; }, {x});
  }
}

TEST(ElementwiseTest, UnaryOpGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const UnaryCase& op : UnaryCases()) {
    SCOPED_TRACE(op.torch_op);
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0])}; },
        {NonContiguousCopy(
            RandomInput({3, 4}, gen, DType::kFloat64, op.positive))});
  }
}

// Expects `actual` to hold fn(x[i], y[i]) for the elements of x and y.
void ExpectElementwise(const Tensor& actual, const Tensor& x, const Tensor& y,
                       const std::function<double(double, double)>& fn,
                       const std::string& what) {
  const std::vector<double> xs = x.ToVector();
  const std::vector<double> ys = y.ToVector();
  std::vector<double> expected;
  for (size_t i = 0; i < xs.size(); ++i) expected.push_back(fn(xs[i], ys[i]));
  ExpectAllClose(actual, FromVector(expected, x.shape(), DType::kFloat64),
                 DefaultTolerance(DType::kFloat64), what);
}

TEST(ElementwiseTest, OperatorsComputeTheirArithmetic) {
  Generator gen = TestGenerator();
  const Tensor x = Randn({3, 4}, gen, DType::kFloat64);
  const Tensor y = RandomInput({3, 4}, gen, DType::kFloat64, true);
  ExpectElementwise(
      x + y, x, y, [](double a, double b) { return a + b; }, "x + y");
  ExpectElementwise(
      x - y, x, y, [](double a, double b) { return a - b; }, "x - y");
  ExpectElementwise(
      x * y, x, y, [](double a, double b) { return a * b; }, "x * y");
  ExpectElementwise(
      x / y, x, y, [](double a, double b) { return a / b; }, "x / y");
  ExpectElementwise(
      x + 2.0, x, y, [](double a, double) { return a + 2; }, "x + 2");
  ExpectElementwise(
      2.0 + x, x, y, [](double a, double) { return 2 + a; }, "2 + x");
  ExpectElementwise(
      x - 2.0, x, y, [](double a, double) { return a - 2; }, "x - 2");
  ExpectElementwise(
      2.0 - x, x, y, [](double a, double) { return 2 - a; }, "2 - x");
  ExpectElementwise(
      x * 3.0, x, y, [](double a, double) { return a * 3; }, "x * 3");
  ExpectElementwise(
      3.0 * x, x, y, [](double a, double) { return 3 * a; }, "3 * x");
  ExpectElementwise(
      x / 4.0, x, y, [](double a, double) { return a / 4; }, "x / 4");
  ExpectElementwise(
      4.0 / y, x, y, [](double, double b) { return 4 / b; }, "4 / y");
  ExpectElementwise(
      -x, x, y, [](double a, double) { return -a; }, "-x");
}

TEST(ElementwiseTest, OutOfDomainInputsGiveNaNOrInfLikeLibm) {
  const Tensor x = FromVector({-1, 0}, {2}, DType::kFloat64);
  const std::vector<double> log = Log(x).ToVector();
  EXPECT_TRUE(std::isnan(log[0]));
  EXPECT_EQ(log[1], -INFINITY);
  const std::vector<double> rsqrt = Rsqrt(x).ToVector();
  EXPECT_TRUE(std::isnan(rsqrt[0]));
  EXPECT_EQ(rsqrt[1], INFINITY);
}

TEST(ElementwiseTest, ShapesThatDoNotBroadcastAreRejected) {
  const Tensor a = Zeros({2, 3});
  const Tensor b = Zeros({4});
  ExpectError([&] { Add(a, b); }, {"Add", "[2, 3]", "[4]", "broadcast"});
  ExpectError([&] { Sub(a, b); }, {"Sub", "[2, 3]", "[4]"});
  ExpectError([&] { Mul(b, a); }, {"Mul", "[4]", "[2, 3]"});
  ExpectError([&] { Div(a, Zeros({3, 2})); }, {"Div", "[2, 3]", "[3, 2]"});
}

TEST(ElementwiseTest, MixedDTypesAreRejected) {
  const Tensor a = Zeros({2}, DType::kFloat32);
  const Tensor b = Zeros({2}, DType::kFloat64);
  ExpectError([&] { Mul(a, b); }, {"Mul", "float64", "float32"});
  ExpectError([&] { Add(b, Zeros({2}, DType::kBFloat16)); },
              {"Add", "bfloat16", "float64"});
}

TEST(ElementwiseTest, NonFloatingAndUndefinedInputsAreRejected) {
  const Tensor ids = Zeros({3}, DType::kInt64);
  ExpectError([&] { Exp(ids); }, {"Exp", "int64"});
  ExpectError([&] { AddScalar(ids, 1); }, {"AddScalar", "int64"});
  ExpectError([&] { Add(ids, ids); }, {"Add", "int64"});
  ExpectError([&] { Neg(Tensor()); }, {"Neg", "undefined"});
}

}  // namespace
}  // namespace lc
