#include "ops/reduce.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
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

struct DimsCase {
  std::vector<int64_t> dims;
  bool keepdim;
};

std::vector<DimsCase> DimsCases() {
  return {{{1}, false},
          {{0, 2}, false},
          {{-1}, true},
          {{2, 0, 1}, false},
          {{-2, 0}, true}};
}

OracleAttrs DimsAttrs(const DimsCase& c) {
  return OracleAttrs{{{"keepdim", c.keepdim}}, {{"dims", c.dims}}, {}};
}

std::string Describe(const DimsCase& c) {
  return "dims {" + absl::StrJoin(c.dims, ", ") + "} keepdim " +
         std::to_string(c.keepdim);
}

TEST(ReduceTest, SumAndMeanOverDimsMatchTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const DimsCase& c : DimsCases()) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " " + Describe(c));
      const Tensor x = Randn({2, 3, 4}, gen, dtype);
      for (const Tensor& input :
           {x, NonContiguousCopy(Randn({2, 3, 4}, gen, dtype)),
            NonContiguousCopy(Randn({2, 3, 4}, gen, dtype),
                              StridedLayout::kTransposed)}) {
        ExpectMatchesTorch(
            "sum",
            [&](const Tensors& in) -> Tensors {
              return {Sum(in[0], c.dims, c.keepdim)};
            },
            {input}, DimsAttrs(c));
        ExpectMatchesTorch(
            "mean",
            [&](const Tensors& in) -> Tensors {
              return {Mean(in[0], c.dims, c.keepdim)};
            },
            {input}, DimsAttrs(c));
      }
    }
  }
}

TEST(ReduceTest, SumAndMeanOfAllElementsMatchTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    SCOPED_TRACE(DTypeName(dtype));
    for (const Tensor& x : {Randn({2, 3, 4}, gen, dtype), Randn({}, gen, dtype),
                            NonContiguousCopy(Randn({5, 3}, gen, dtype)),
                            NonContiguousCopy(Randn({5, 3}, gen, dtype),
                                              StridedLayout::kTransposed)}) {
      EXPECT_EQ(Sum(x).shape(), Shape{});
      ExpectMatchesTorch(
          "sum", [](const Tensors& in) -> Tensors { return {Sum(in[0])}; },
          {x});
      ExpectMatchesTorch(
          "mean", [](const Tensors& in) -> Tensors { return {Mean(in[0])}; },
          {x});
    }
  }
}

TEST(ReduceTest, Float32SumsAccumulateInFloat64) {
  // 2^24 + 1 rounds back to 2^24 in float32, so a float32 accumulator would
  // return 2^24 for 2^24 followed by 1000 ones; the float64 accumulator gives
  // the exact (and in float32 representable) 2^24 + 1000.
  std::vector<double> values(1001, 1.0);
  values[0] = 16777216.0;
  const Tensor x = FromVector(values, {1, 1001}, DType::kFloat32);
  EXPECT_EQ(Sum(x).item(), 16777216.0 + 1000);
  EXPECT_EQ(Sum(x, {1}).item(), 16777216.0 + 1000);
}

TEST(ReduceTest, SumAndMeanMatchTorchInBFloat16) {
  Generator gen = TestGenerator();
  const Tensor x = Randn({4, 6}, gen, DType::kBFloat16);
  const DimsCase c{{0}, false};
  EXPECT_EQ(Sum(x, c.dims).dtype(), DType::kBFloat16);
  ExpectMatchesTorch(
      "sum", [&](const Tensors& in) -> Tensors { return {Sum(in[0], c.dims)}; },
      {x}, DimsAttrs(c));
  ExpectMatchesTorch(
      "mean", [](const Tensors& in) -> Tensors { return {Mean(in[0])}; }, {x});
}

TEST(ReduceTest, SumAndMeanGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const DimsCase& c : DimsCases()) {
    SCOPED_TRACE(Describe(c));
    const Tensor x = NonContiguousCopy(Randn({2, 3, 4}, gen, DType::kFloat64));
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors {
          return {Sum(in[0], c.dims, c.keepdim)};
        },
        {x});
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors {
          return {Mean(in[0], c.dims, c.keepdim)};
        },
        {x});
  }
  // A strided output gradient reaches Sum's backward through the transpose.
  ExpectGradientsMatchFiniteDifferences(
      [](const Tensors& in) -> Tensors {
        return {Sum(in[0], {1}).transpose(0, 1)};
      },
      {Randn({3, 4, 2}, gen, DType::kFloat64)});
}

TEST(ReduceTest, MaxMatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (int64_t dim : {0, 1, -1}) {
      for (bool keepdim : {false, true}) {
        SCOPED_TRACE(std::string(DTypeName(dtype)) + " dim " +
                     std::to_string(dim) + " keepdim " +
                     std::to_string(keepdim));
        const auto fn = [&](const Tensors& in) -> Tensors {
          return {Max(in[0], dim, keepdim)};
        };
        const OracleAttrs attrs{
            {{"dim", static_cast<double>(dim)}, {"keepdim", keepdim}}, {}, {}};
        ExpectMatchesTorch("max", fn, {Randn({3, 4, 5}, gen, dtype)}, attrs);
        for (StridedLayout layout : kStridedLayouts) {
          SCOPED_TRACE(StridedLayoutName(layout));
          ExpectMatchesTorch(
              "max", fn,
              {NonContiguousCopy(Randn({3, 4, 5}, gen, dtype), layout)}, attrs);
        }
      }
    }
  }
}

TEST(ReduceTest, MaxMatchesTorchInBFloat16) {
  Generator gen = TestGenerator();
  const Tensor x = Randn({5, 6}, gen, DType::kBFloat16);
  EXPECT_EQ(Max(x, 1).dtype(), DType::kBFloat16);
  ExpectMatchesTorch(
      "max", [](const Tensors& in) -> Tensors { return {Max(in[0], 1)}; }, {x},
      OracleAttrs{{{"dim", 1}}, {}, {}});
}

TEST(ReduceTest, MaxGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (int64_t dim : {0, 1, 2}) {
    SCOPED_TRACE(dim);
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors { return {Max(in[0], dim)}; },
        {NonContiguousCopy(Randn({3, 4, 5}, gen, DType::kFloat64))});
  }
}

TEST(ReduceTest, MaxGradientGoesToTheFirstMaximum) {
  Tensor x = FromVector({1, 3, 3, 2, 5, 5, 0, 5}, {2, 4}, DType::kFloat64);
  x.set_requires_grad(true);
  const Tensor y = Max(x, 1);
  EXPECT_EQ(y.ToVector(), (std::vector<double>{3, 5}));
  y.backward(FromVector({10, 20}, {2}, DType::kFloat64));
  EXPECT_EQ(x.grad().ToVector(),
            (std::vector<double>{0, 10, 0, 0, 20, 0, 0, 0}));
}

TEST(ReduceTest, MaxPropagatesNaN) {
  const Tensor x = FromVector({1, NAN, 3}, {3}, DType::kFloat64);
  EXPECT_TRUE(std::isnan(Max(x, 0).item()));
}

struct SumToShapeCase {
  Shape from;
  Shape to;
};

TEST(ReduceTest, SumToShapeMatchesTorch) {
  Generator gen = TestGenerator();
  const std::vector<SumToShapeCase> cases = {
      {{2, 3, 4}, {3, 1}},    {{2, 3, 4}, {4}}, {{2, 3, 4}, {1, 4}},
      {{2, 3, 4}, {2, 1, 1}}, {{2, 3, 4}, {}},  {{2, 3, 4}, {2, 3, 4}},
      {{3, 1}, {1}}};
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const SumToShapeCase& c : cases) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " " + ShapeToString(c.from) +
                   " to " + ShapeToString(c.to));
      const auto fn = [&](const Tensors& in) -> Tensors {
        return {SumToShape(in[0], c.to)};
      };
      const OracleAttrs attrs{{}, {{"shape", c.to}}, {}};
      ExpectMatchesTorch("sum_to_shape", fn, {Randn(c.from, gen, dtype)},
                         attrs);
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch(
            "sum_to_shape", fn,
            {NonContiguousCopy(Randn(c.from, gen, dtype), layout)}, attrs);
      }
      if (dtype == DType::kFloat64) {
        ExpectGradientsMatchFiniteDifferences(fn, {Randn(c.from, gen, dtype)});
      }
    }
  }
}

TEST(ReduceTest, SumToShapeOfEqualShapeIsTheTensorItself) {
  const Tensor x = Zeros({2, 3});
  EXPECT_EQ(SumToShape(x, {2, 3}).impl_ptr(), x.impl_ptr());
}

TEST(ReduceTest, BadDimsAreRejected) {
  const Tensor x = Zeros({2, 3, 4});
  ExpectError([&] { Sum(x, {3}); }, {"Sum", "dim 3", "rank 3"});
  ExpectError([&] { Mean(x, {-4}); }, {"Mean", "dim -4", "rank 3"});
  ExpectError([&] { Sum(x, {1, -2}); }, {"Sum", "[1, -2]", "twice"});
  ExpectError([&] { Mean(x, {}); }, {"Mean", "empty"});
  ExpectError([&] { Max(x, 5); }, {"Max", "dim 5", "rank 3"});
  ExpectError([&] { Max(Zeros({2, 0}), 1); }, {"Max", "[2, 0]", "size 0"});
}

TEST(ReduceTest, ShapeThatDoesNotBroadcastIsRejected) {
  const Tensor x = Zeros({2, 3});
  ExpectError([&] { SumToShape(x, {4}); },
              {"SumToShape", "[4]", "[2, 3]", "broadcast"});
  ExpectError(
      [&] {
        SumToShape(x, {1, 2, 3});
      },
      {"SumToShape", "[1, 2, 3]", "[2, 3]"});
}

TEST(ReduceTest, NonFloatingInputsAreRejected) {
  const Tensor ids = Zeros({2, 3}, DType::kInt64);
  ExpectError([&] { Sum(ids); }, {"Sum", "int64"});
  ExpectError([&] { Mean(ids, {0}); }, {"Mean", "int64"});
  ExpectError([&] { Max(ids, 0); }, {"Max", "int64"});
}

}  // namespace
}  // namespace lc
