#include "ops/shape_ops.h"

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

OracleAttrs DimAttrs(int64_t dim) {
  OracleAttrs attrs;
  attrs.numbers["dim"] = static_cast<double>(dim);
  return attrs;
}

Tensor Indices(const std::vector<double>& values) {
  return FromVector(values, {static_cast<int64_t>(values.size())},
                    DType::kInt64);
}

// ---- Concat ----

OpFn ConcatFn(int64_t dim) {
  return [=](const Tensors& in) { return Tensors{Concat(in, dim)}; };
}

struct ConcatCase {
  std::vector<Shape> shapes;
  int64_t dim;
};

std::vector<ConcatCase> ConcatCases() {
  return {
      {{{2, 3}, {2, 1}, {2, 4}}, 1},
      {{{1, 3, 2}, {4, 3, 2}}, 0},
      {{{2, 2, 3}, {2, 2, 0}, {2, 2, 2}}, -1},
      {{{5}}, 0},
  };
}

TEST(ConcatTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const ConcatCase& c : ConcatCases()) {
      SCOPED_TRACE(DTypeName(dtype) + " dim " + std::to_string(c.dim));
      Tensors dense;
      for (const Shape& shape : c.shapes) {
        dense.push_back(Randn(shape, gen, dtype));
      }
      ExpectMatchesTorch("concat", ConcatFn(c.dim), dense, DimAttrs(c.dim));
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        Tensors strided;
        for (const Tensor& t : dense) {
          strided.push_back(NonContiguousCopy(t, layout));
        }
        ExpectMatchesTorch("concat", ConcatFn(c.dim), strided, DimAttrs(c.dim));
      }
    }
  }
}

TEST(ConcatTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const ConcatCase& c : ConcatCases()) {
    SCOPED_TRACE(c.dim);
    Tensors inputs;
    for (const Shape& shape : c.shapes) {
      inputs.push_back(Randn(shape, gen, DType::kFloat64));
    }
    ExpectGradientsMatchFiniteDifferences(ConcatFn(c.dim), inputs);
  }
}

TEST(ConcatTest, JoinsIntegerTensors) {
  const Tensor out = Concat({Indices({1, 2}), Indices({3})}, 0);
  EXPECT_EQ(out.dtype(), DType::kInt64);
  EXPECT_EQ(out.ToVector(), (std::vector<double>{1, 2, 3}));
}

TEST(ConcatTest, RejectsMismatchedSizes) {
  const absl::Status s = StatusFromCall([] {
    Concat({Zeros({2, 3}), Zeros({3, 3})}, 1);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Concat"), HasSubstr("tensor 1"),
                    HasSubstr("[3, 3]"), HasSubstr("[2, 3]")));
}

TEST(ConcatTest, RejectsMixedDtypes) {
  const absl::Status s = StatusFromCall([] {
    Concat({Zeros({2}), Zeros({2}, DType::kFloat64)}, 0);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("Concat"), HasSubstr("float64"), HasSubstr("float32")));
}

TEST(ConcatTest, RejectsEmptyList) {
  const absl::Status s = StatusFromCall([] { Concat({}, 0); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Concat"), HasSubstr("at least one")));
}

// ---- Split ----

OpFn SplitFn(std::vector<int64_t> sizes, int64_t dim) {
  return [=](const Tensors& in) { return Split(in[0], sizes, dim); };
}

OracleAttrs SplitAttrs(const std::vector<int64_t>& sizes, int64_t dim) {
  OracleAttrs attrs = DimAttrs(dim);
  attrs.lists["sizes"] = sizes;
  return attrs;
}

struct SplitCase {
  Shape shape;
  std::vector<int64_t> sizes;
  int64_t dim;
};

std::vector<SplitCase> SplitCases() {
  return {
      {{2, 6}, {2, 0, 3, 1}, 1},
      {{5, 2, 3}, {4, 1}, 0},
      {{2, 3, 4}, {1, 1, 1}, -2},
      {{7}, {7}, 0},
  };
}

TEST(SplitTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const SplitCase& c : SplitCases()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(c.shape));
      const Tensor x = Randn(c.shape, gen, dtype);
      ExpectMatchesTorch("split", SplitFn(c.sizes, c.dim), {x},
                         SplitAttrs(c.sizes, c.dim));
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("split", SplitFn(c.sizes, c.dim),
                           {NonContiguousCopy(x, layout)},
                           SplitAttrs(c.sizes, c.dim));
      }
    }
  }
}

TEST(SplitTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const SplitCase& c : SplitCases()) {
    SCOPED_TRACE(ShapeToString(c.shape));
    ExpectGradientsMatchFiniteDifferences(
        SplitFn(c.sizes, c.dim), {Randn(c.shape, gen, DType::kFloat64)});
  }
}

TEST(SplitTest, PiecesAreViewsOfTheInput) {
  const Tensor x = Zeros({3, 4});
  const std::vector<Tensor> pieces = Split(x, {1, 3}, 1);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[1].storage(), x.storage());
  pieces[1].set({2, 0}, 7.0);
  EXPECT_EQ(x.at({2, 1}), 7.0);
}

TEST(SplitTest, RejectsSizesThatDoNotSumToTheDim) {
  const absl::Status s = StatusFromCall([] {
    Split(Zeros({2, 6}), {2, 3}, 1);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("Split"), HasSubstr("sum to 5"), HasSubstr("size 6")));
}

TEST(SplitTest, RejectsNegativeSize) {
  const absl::Status s = StatusFromCall([] {
    Split(Zeros({2, 6}), {8, -2}, 1);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Split"), HasSubstr("-2")));
}

// ---- IndexSelect ----

OpFn IndexSelectFn(int64_t dim) {
  return [=](const Tensors& in) {
    return Tensors{IndexSelect(in[0], dim, in[1])};
  };
}

struct IndexSelectCase {
  Shape shape;
  int64_t dim;
  Tensor indices;
};

// Repeated indices (their gradients add up), fewer and more indices than
// the dim, and every dim position.
std::vector<IndexSelectCase> IndexSelectCases() {
  return {
      {{4, 3}, 0, Indices({3, 0, 3, 1, 3})},
      {{2, 5, 3}, 1, Indices({4, 2})},
      {{2, 3, 4}, -1, Indices({0, 0, 3, 1, 2, 0})},
      {{3}, 0, Indices({2, 1, 2})},
  };
}

TEST(IndexSelectTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const IndexSelectCase& c : IndexSelectCases()) {
      SCOPED_TRACE(DTypeName(dtype) + " " + ShapeToString(c.shape) + " dim " +
                   std::to_string(c.dim));
      const Tensor x = Randn(c.shape, gen, dtype);
      ExpectMatchesTorch("index_select", IndexSelectFn(c.dim), {x, c.indices},
                         DimAttrs(c.dim));
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("index_select", IndexSelectFn(c.dim),
                           {NonContiguousCopy(x, layout), c.indices},
                           DimAttrs(c.dim));
      }
    }
  }
}

TEST(IndexSelectTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const IndexSelectCase& c : IndexSelectCases()) {
    SCOPED_TRACE(ShapeToString(c.shape));
    ExpectGradientsMatchFiniteDifferences(
        IndexSelectFn(c.dim),
        {Randn(c.shape, gen, DType::kFloat64), c.indices});
  }
}

TEST(IndexSelectTest, SelectsFromIntegerAndBFloat16Tensors) {
  const Tensor ids = Indices({10, 20, 30, 40});
  EXPECT_EQ(IndexSelect(ids, 0, Indices({3, 0})).ToVector(),
            (std::vector<double>{40, 10}));
  const Tensor x = FromVector({1, 2, 3, 4}, {2, 2}, DType::kBFloat16);
  const Tensor y = IndexSelect(x, 1, Indices({1, 1, 0}));
  EXPECT_EQ(y.dtype(), DType::kBFloat16);
  EXPECT_EQ(y.ToVector(), (std::vector<double>{2, 2, 1, 4, 4, 3}));
}

TEST(IndexSelectTest, RejectsIndexOutOfRange) {
  const absl::Status s = StatusFromCall([] {
    IndexSelect(Zeros({2, 5}), 1, Indices({0, 4, 9}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("IndexSelect"), HasSubstr("value 9"),
                    HasSubstr("position 2"), HasSubstr("< 5")));
}

TEST(IndexSelectTest, RejectsIndicesThatAreNot1D) {
  const absl::Status s = StatusFromCall([] {
    IndexSelect(Zeros({2, 5}), 0, FromVector({0, 1}, {1, 2}, DType::kInt64));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("IndexSelect"), HasSubstr("[1, 2]"), HasSubstr("1-D")));
}

TEST(IndexSelectTest, RejectsNonIntegerIndices) {
  const absl::Status s = StatusFromCall([] {
    IndexSelect(Zeros({2, 5}), 0, FromVector({0, 1}, {2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("IndexSelect"), HasSubstr("float32"),
                    HasSubstr("int64")));
}

}  // namespace
}  // namespace lc
