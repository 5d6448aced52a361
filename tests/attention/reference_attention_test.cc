// PairCounts and DropoutKeepWeights on hand-checked examples, and
// ReferenceAttention (the float64 oracle) against torch.
#include "attention/reference_attention.h"

#include <cmath>
#include <vector>

#include "attention/attention.h"
#include "core/random.h"
#include "gtest/gtest.h"
#include "tests/attention/attention_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::DefaultTolerance;
using testing::ExpectAllClose;
using testing::ExpectError;
using testing::ExpectLseClose;
using testing::OracleAttrs;
using testing::RunTorchOp;
using testing::TestGenerator;

AttentionPattern AllHeads48() {
  // Head 0: (4, 1, 0) and (8, 2, 0); head 1: (4, 1, 0) and (8, 2, 1).
  AttentionPattern pattern;
  pattern.head_patterns = {{{4, 1, 0}, {8, 2, 0}}, {{4, 1, 0}, {8, 2, 1}}};
  return pattern;
}

TEST(ReferenceAttentionTest, PairCountsCountPatternsPerPair) {
  const AttentionPattern pattern = AllHeads48();
  const Tensor c = PairCounts(pattern, /*causal=*/false, Tensor(), 1, 8);
  ASSERT_EQ(c.shape(), (Shape{1, 2, 8, 8}));
  ASSERT_EQ(c.dtype(), DType::kFloat64);
  // t = 6, u = 4: same 4-segment, both even: both patterns of head 0.
  EXPECT_EQ(c.at({0, 0, 6, 4}), 2);
  EXPECT_EQ(c.at({0, 0, 6, 5}), 1);  // 5 is odd: only (4, 1, 0)
  EXPECT_EQ(c.at({0, 0, 6, 2}), 1);  // other 4-segment: only (8, 2, 0)
  EXPECT_EQ(c.at({0, 0, 6, 3}), 0);
  EXPECT_EQ(c.at({0, 1, 5, 3}), 1);  // odd pair under (8, 2, 1)
  EXPECT_EQ(c.at({0, 1, 5, 7}), 2);
  EXPECT_EQ(c.at({0, 1, 6, 4}), 1);
  EXPECT_EQ(c.at({0, 0, 4, 6}), 2);  // not causal: the future counts
  const Tensor causal = PairCounts(pattern, /*causal=*/true, Tensor(), 1, 8);
  EXPECT_EQ(causal.at({0, 0, 4, 6}), 0);
  EXPECT_EQ(causal.at({0, 0, 6, 4}), 2);

  // Block mask of 3-token blocks, only the diagonal on.
  AttentionPattern blocked = pattern;
  blocked.block_mask = std::make_shared<BlockMask>(
      BlockMask::FromPairs(3, 3, [](int64_t q, int64_t k) { return q == k; }));
  const Tensor cb = PairCounts(blocked, false, Tensor(), 1, 8);
  EXPECT_EQ(cb.at({0, 0, 6, 4}), 0);  // blocks 2 and 1
  EXPECT_EQ(cb.at({0, 0, 7, 6}), 1);  // block 2, same 4-segment
  EXPECT_EQ(cb.at({0, 0, 5, 4}), 1);  // block 1; 5 odd: only (4, 1, 0)

  // Padding: key 4 of batch 1 only.
  Tensor padding = Zeros({2, 8}, DType::kUInt8);
  padding.set({1, 4}, 1);
  const Tensor cp = PairCounts(pattern, false, padding, 2, 8);
  EXPECT_EQ(cp.at({0, 0, 6, 4}), 2);
  EXPECT_EQ(cp.at({1, 0, 6, 4}), 0);
  EXPECT_EQ(cp.at({1, 0, 6, 5}), 1);
}

TEST(ReferenceAttentionTest, DropoutKeepWeightsAreSingleDrawsPerPattern) {
  const AttentionPattern pattern = AllHeads48();
  const int64_t n = 128;
  AttentionPattern wide;
  wide.head_patterns = {{{16, 1, 0}, {32, 2, 0}}, {{16, 1, 0}, {32, 2, 1}}};
  const Tensor counts = PairCounts(wide, false, Tensor(), 2, n);
  EXPECT_TRUE(testing::BitwiseEqual(
      DropoutKeepWeights(wide, false, Tensor(), 2, n, 0, 17, 3), counts));
  const double p = 0.3;
  const std::vector<double> c = counts.ToVector();
  const std::vector<double> k =
      DropoutKeepWeights(wide, false, Tensor(), 2, n, p, 17, 3).ToVector();
  const std::vector<double> other =
      DropoutKeepWeights(wide, false, Tensor(), 2, n, p, 17, 4).ToVector();
  double draws = 0, kept = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    const double factors = k[i] * (1 - p);  // patterns whose draw kept it
    ASSERT_NEAR(factors, std::round(factors), 1e-12);
    ASSERT_LE(std::round(factors), c[i]);
    draws += c[i];
    kept += std::round(factors);
  }
  // About 1 - p of 12288 draws are kept: 0.025 is 6 binomial sd (0.0041).
  EXPECT_EQ(draws, 12288);
  EXPECT_NEAR(kept / draws, 1 - p, 0.025);
  EXPECT_NE(k, other) << "another offset draws another mask";
  ExpectError(
      [&] { DropoutKeepWeights(pattern, false, Tensor(), 1, 8, 1, 0, 0); },
      {"dropout 1", "[0, 1)"});
}

// ReferenceAttention against the torch oracle (float64, 1e-10): dense and
// all-heads dilated with a block mask and padding.
TEST(ReferenceAttentionTest, MatchesTorch) {
  Generator gen = TestGenerator();
  const int64_t batch = 2, n = 30, heads = 2, dim = 5;
  AttentionPattern pattern;
  pattern.head_patterns = {{{8, 1, 0}, {16, 2, 0}}, {{8, 1, 0}, {16, 2, 1}}};
  BlockSparseOptions random;
  random.pattern = SparsePattern::kRandom;
  random.block_size = 4;
  random.density = 0.5;
  random.seed = 9;
  auto mask = MakeBlockMask(random, n);
  ASSERT_TRUE(mask.ok());
  pattern.block_mask = std::make_shared<BlockMask>(*mask);
  AttentionOptions options;
  AttentionCallOptions call;
  options.causal = true;
  std::vector<double> bits = Rand({batch, n}, gen).ToVector();
  for (double& b : bits) b = b < 0.2;
  call.key_padding_mask = FromVector(bits, {batch, n}, DType::kUInt8);
  const Shape shape = {batch, n, heads, dim};
  const Tensor q = Randn(shape, gen, DType::kFloat64),
               k = Randn(shape, gen, DType::kFloat64),
               v = Randn(shape, gen, DType::kFloat64);
  const AttentionResult r = ReferenceAttention(q, k, v, pattern, options, call);
  EXPECT_FALSE(r.out.requires_grad());
  const Tensor counts =
      PairCounts(pattern, true, call.key_padding_mask, batch, n);
  OracleAttrs attrs;
  attrs.numbers["scale"] = 1 / std::sqrt(5.0);
  const testing::OracleResult want =
      RunTorchOp("masked_attention", {q, k, v, counts, counts}, attrs);
  const auto tol = DefaultTolerance(DType::kFloat64);
  ExpectAllClose(r.out, want.outputs[0], tol, "out");
  ExpectLseClose(r.lse, want.outputs[1], tol, "lse");
}

TEST(ReferenceAttentionTest, RejectsBadInputs) {
  const Tensor q = Zeros({1, 8, 2, 4}, DType::kFloat64);
  const AttentionPattern pattern = AllHeads48();
  ExpectError(
      [&] {
        ReferenceAttention(q, q, Zeros({1, 8, 2, 3}), pattern);
      },
      {"same shape"});
  AttentionPattern one_head;
  one_head.head_patterns = {{DensePattern(8)}};
  ExpectError([&] { ReferenceAttention(q, q, q, one_head); },
              {"pattern has 1 heads", "q has 2"});
  ExpectError(
      [&] {
        PairCounts(pattern, false, Zeros({1, 7}, DType::kUInt8), 1, 8);
      },
      {"key_padding_mask", "expected uint8 [1, 8]"});
  AttentionPattern bad;
  bad.head_patterns = {{{4, 2, 2}}};
  ExpectError([&] { PairCounts(bad, false, Tensor(), 1, 8); },
              {"o=2", "0 <= o < r"});
}

}  // namespace
}  // namespace lc
