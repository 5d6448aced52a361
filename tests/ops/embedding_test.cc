#include "ops/embedding.h"

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
using ::lc::testing::StridedLayout;
using ::lc::testing::StridedLayoutName;
using ::lc::testing::TestGenerator;
using ::testing::AllOf;
using ::testing::HasSubstr;

Tensors EmbeddingOp(const Tensors& in) { return {Embedding(in[0], in[1])}; }

Tensor Indices(const std::vector<double>& values, const Shape& shape) {
  return FromVector(values, shape, DType::kInt64);
}

struct EmbeddingCase {
  Shape weight;
  Tensor indices;
};

// Repeated ids (their gradients must add up), several index shapes including
// a scalar, and the first and last rows.
std::vector<EmbeddingCase> Cases() {
  return {
      {{5, 3}, Indices({4, 0, 4, 2, 4}, {5})},
      {{7, 4}, Indices({6, 1, 1, 0, 3, 6}, {2, 3})},
      {{3, 2}, Indices({2, 2, 0, 1, 2, 0, 1, 1}, {2, 2, 2})},
      {{6, 5}, Indices({3}, {})},
      {{1, 8}, Indices({0, 0}, {2})},
  };
}

TEST(EmbeddingTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (const EmbeddingCase& c : Cases()) {
      SCOPED_TRACE(DTypeName(dtype) + " weight " + ShapeToString(c.weight) +
                   " indices " + ShapeToString(c.indices.shape()));
      const Tensor weight = Randn(c.weight, gen, dtype);
      ExpectMatchesTorch("embedding", EmbeddingOp, {weight, c.indices});
      for (StridedLayout layout : kStridedLayouts) {
        SCOPED_TRACE(StridedLayoutName(layout));
        ExpectMatchesTorch("embedding", EmbeddingOp,
                           {NonContiguousCopy(weight, layout), c.indices});
      }
    }
  }
}

TEST(EmbeddingTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const EmbeddingCase& c : Cases()) {
    SCOPED_TRACE(ShapeToString(c.weight));
    ExpectGradientsMatchFiniteDifferences(
        EmbeddingOp, {Randn(c.weight, gen, DType::kFloat64), c.indices});
  }
}

TEST(EmbeddingTest, RejectsIndexAtOrAboveVocabularySize) {
  const absl::Status s = StatusFromCall([] {
    Embedding(Ones({5, 3}), Indices({1, 5, 2}, {3}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  // Names the op, the bad index, its position and V.
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Embedding"), HasSubstr("value 5"),
                    HasSubstr("position 1"), HasSubstr("< 5")));
}

TEST(EmbeddingTest, RejectsNegativeIndex) {
  const absl::Status s = StatusFromCall([] {
    Embedding(Ones({5, 3}), Indices({-1}, {1}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Embedding"), HasSubstr("value -1")));
}

TEST(EmbeddingTest, RejectsNonIntegerIndices) {
  const absl::Status s = StatusFromCall([] {
    Embedding(Ones({5, 3}), FromVector({1, 2}, {2}));
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("Embedding"), HasSubstr("float32"), HasSubstr("int64")));
}

TEST(EmbeddingTest, RejectsWeightThatIsNotAMatrix) {
  const absl::Status s =
      StatusFromCall([] { Embedding(Ones({5}), Indices({1}, {1})); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      AllOf(HasSubstr("Embedding"), HasSubstr("[5]"), HasSubstr("2-D")));
}

}  // namespace
}  // namespace lc
