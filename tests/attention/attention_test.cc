// lc::Attention against the torch oracle and ReferenceAttention for every
// pattern type (dense, dilated head groups and all heads, block-sparse, their
// intersection), causal and not, with small and default tiles; float32 and
// bfloat16 against float64; float32 with scores near 500; finite
// differences; key padding; dropout; tile order. The oracle's pair counts
// come from the test's own reading of the options (attention_test_util.h).
// Also: hand-written block masks and head patterns, and the overflow-safe
// merge of two partial results.
#include "attention/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/attention_cuda_plan.h"
#include "attention/attention_kernel.h"
#include "attention/attention_plan.h"
#include "attention/partial_attention.h"
#include "attention/reference_attention.h"
#include "attention/tile_plan.h"
#include "core/autograd.h"
#include "core/random.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "tests/attention/attention_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::AttentionCase;
using testing::BitwiseEqual;
using testing::BlockSparseSpec;
using testing::DefaultTolerance;
using testing::DenseSpec;
using testing::DilatedSpec;
using testing::DropoutGeneratorState;
using testing::ExpectAllClose;
using testing::ExpectAttentionMatchesOracle;
using testing::ExpectGradientsMatchFiniteDifferences;
using testing::ExpectLseClose;
using testing::OpFn;
using testing::PatternSpec;
using testing::Qkv;
using testing::RandomQkv;
using testing::TestGenerator;
using testing::Tolerance;

// DefaultTolerance(dtype)'s relative bound, also applied to the largest
// finite |entry| of `expected` as the absolute bound: for comparisons whose
// rounding scales with the terms summed rather than with each result.
Tolerance ScaledTolerance(const Tensor& expected, DType dtype) {
  double largest = 0;
  for (double x : expected.ToVector()) {
    if (std::isfinite(x)) largest = std::max(largest, std::abs(x));
  }
  const Tolerance base = DefaultTolerance(dtype);
  return {base.rtol, std::max(base.atol, base.rtol * largest)};
}

AttentionCase Case(std::string name, int64_t n, int64_t heads,
                   PatternSpec spec) {
  return testing::MakeAttentionCase(std::move(name), n, heads, std::move(spec));
}

BlockSparseOptions Sparse(SparsePattern pattern, int64_t block_size) {
  BlockSparseOptions o;
  o.pattern = pattern;
  o.block_size = block_size;
  return o;
}

// An explicit block mask over `blocks` blocks: random pairs on, the
// diagonal on except in the last row, which is entirely off (its queries
// have no key at all).
std::vector<uint8_t> RandomExplicitMask(int64_t blocks, Generator& gen) {
  const std::vector<double> u = Rand({blocks, blocks}, gen).ToVector();
  std::vector<uint8_t> mask(blocks * blocks);
  for (int64_t q = 0; q < blocks; ++q) {
    for (int64_t k = 0; k < blocks; ++k) {
      const bool on = q == k || u[q * blocks + k] < 0.4;
      mask[q * blocks + k] = q == blocks - 1 ? 0 : on;
    }
  }
  return mask;
}

// One case per pattern type and shape edge; n is never a multiple of the
// block size and mostly not of the segment lengths.
std::vector<AttentionCase> PatternCases(Generator& gen) {
  std::vector<AttentionCase> cases;
  cases.push_back(Case("dense", 37, 3, DenseSpec()));
  // Head groups: n divisible by every segment length.
  cases.push_back(Case("head_groups w{8,16} r{1,2} n48", 48, 4,
                       DilatedSpec({8, 16}, {1, 2}, HeadLayout::kHeadGroups)));
  // Head groups: last segments short (53 = 5*10+3 = 2*24+5), r up to 3.
  cases.push_back(Case("head_groups w{10,24} r{2,3} n53", 53, 4,
                       DilatedSpec({10, 24}, {2, 3}, HeadLayout::kHeadGroups)));
  // 5 heads in 3 groups (sizes 2, 2, 1), offsets g mod r = 0, 1, 2.
  cases.push_back(
      Case("head_groups 5 heads 3 groups n41", 41, 5,
           DilatedSpec({6, 12, 20}, {1, 2, 4}, HeadLayout::kHeadGroups)));
  // Fewer heads than groups: the last group is empty.
  cases.push_back(
      Case("head_groups 2 heads 3 groups n45", 45, 2,
           DilatedSpec({8, 16, 32}, {1, 2, 4}, HeadLayout::kHeadGroups)));
  cases.push_back(Case("all_heads w{8,16} r{1,2} n40", 40, 3,
                       DilatedSpec({8, 16}, {1, 2}, HeadLayout::kAllHeads)));
  // All heads, offsets j mod r over 5 heads, last segments short.
  cases.push_back(
      Case("all_heads w{7,15,31} r{1,3,5} n45", 45, 5,
           DilatedSpec({7, 15, 31}, {1, 3, 5}, HeadLayout::kAllHeads)));
  // Block-sparse, block size 8 over n = 45 (6 blocks, the last of 5).
  const int64_t n = 45;
  BlockSparseOptions local = Sparse(SparsePattern::kLocalWindow, 8);
  local.window = 8;
  cases.push_back(Case("local_window", n, 2, BlockSparseSpec(local)));
  BlockSparseOptions dilated = Sparse(SparsePattern::kDilatedSparse, 8);
  dilated.stride = 2;
  cases.push_back(Case("dilated_sparse", n, 2, BlockSparseSpec(dilated)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 8);
  global.global_tokens = 8;
  global.window = 0;
  cases.push_back(Case("global_local", n, 2, BlockSparseSpec(global)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 8);
  random.seed = 7;
  random.density = 0.3;
  cases.push_back(Case("random", n, 2, BlockSparseSpec(random)));
  BlockSparseOptions explicit_mask = Sparse(SparsePattern::kExplicit, 8);
  explicit_mask.explicit_mask = RandomExplicitMask(6, gen);
  cases.push_back(Case("explicit", n, 2, BlockSparseSpec(explicit_mask)));
  // A dilated pattern intersected with a block mask (block 6, n = 50).
  BlockSparseOptions window6 = Sparse(SparsePattern::kLocalWindow, 6);
  window6.window = 6;
  cases.push_back(
      Case("dilated x local_window", 50, 2,
           BlockSparseSpec(
               window6,
               DilatedSpec({16, 32}, {1, 2}, HeadLayout::kAllHeads).dilated)));
  return cases;
}

// Every pattern type, causal and not, with tiles that split segments and
// blocks (5 x 7) and with the default tiles: forward and every gradient in
// float64 against the torch oracle (1e-10 relative: float64 rounding
// accumulated over < 100-term sums), the -inf rows of lse, and
// ReferenceAttention.
TEST(AttentionTest, EveryPatternMatchesTorchInFloat64) {
  Generator gen = TestGenerator();
  for (AttentionCase c : PatternCases(gen)) {
    for (bool causal : {false, true}) {
      for (auto [query_tile, key_tile] :
           {std::pair<int64_t, int64_t>{5, 7}, {128, 256}}) {
        c.options.causal = causal;
        c.options.query_tile = query_tile;
        c.options.key_tile = key_tile;
        ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
      }
    }
  }
}

// The primitive in float32: forward against ReferenceAttention in float64
// within DefaultTolerance(kFloat32) (~1e-5 relative after accumulation), and
// forward and gradients against the float64 oracle within 1e-5 relative and
// 1e-5 absolute: a gradient entry is a sum over up to 50 queries of O(1)
// terms (standard-normal inputs, probabilities <= 1) that may nearly cancel,
// so its float32 error (observed up to 2e-6) scales with the terms, not with
// the entry.
TEST(AttentionTest, Float32MatchesFloat64Reference) {
  Generator gen = TestGenerator();
  for (AttentionCase c : PatternCases(gen)) {
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      c.options.query_tile = 5;
      c.options.key_tile = 7;
      SCOPED_TRACE(c.name + (causal ? " causal" : ""));
      const Qkv in = RandomQkv(c, DType::kFloat32, gen);
      const AttentionResult got =
          Attention(in.q, in.k, in.v, c.pattern, c.options, c.call);
      ASSERT_EQ(got.out.dtype(), DType::kFloat32);
      ASSERT_EQ(got.lse.dtype(), DType::kFloat32);
      const AttentionResult want =
          ReferenceAttention(in.q, in.k, in.v, c.pattern, c.options, c.call);
      const Tolerance tol = DefaultTolerance(DType::kFloat32);
      ExpectAllClose(got.out, want.out, tol, "float32 out");
      ExpectLseClose(got.lse, want.lse, tol, "float32 lse");
      const Tolerance gradient_tol = {tol.rtol, tol.rtol};
      ExpectAttentionMatchesOracle(c, in, &gradient_tol);
    }
  }
}

// bfloat16 inputs (computed in float32, out rounded to bfloat16): within the
// bfloat16 tolerance (8 significant bits: 1e-2 relative).
TEST(AttentionTest, BFloat16MatchesTorch) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("all_heads bf16", 40, 3,
                         DilatedSpec({8, 16}, {1, 2}, HeadLayout::kAllHeads));
  c.options.causal = true;
  c.options.query_tile = 5;
  c.options.key_tile = 7;
  const Qkv in = RandomQkv(c, DType::kBFloat16, gen);
  const AttentionResult r =
      Attention(in.q, in.k, in.v, c.pattern, c.options, c.call);
  EXPECT_EQ(r.out.dtype(), DType::kBFloat16);
  EXPECT_EQ(r.lse.dtype(), DType::kFloat32);
  ExpectAttentionMatchesOracle(c, in);
}

// Analytic gradients (of out and lse) against central differences in
// float64 for a dilated causal case: eps 1e-6 gives truncation error ~1e-12
// and cancellation error ~1e-10 on O(1) values, so 1e-6 is a safe bound.
TEST(AttentionTest, DilatedCausalGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  const int64_t n = 16, heads = 2, head_dim = 4;
  const AttentionPattern pattern = testing::DilatedHeads(
      *DilatedSpec({4, 8}, {1, 2}, HeadLayout::kAllHeads).dilated, heads);
  AttentionOptions options;
  options.causal = true;
  options.query_tile = 3;
  options.key_tile = 2;
  const OpFn fn = [&](const Tensors& in) -> Tensors {
    AttentionResult r = Attention(in[0], in[1], in[2], pattern, options);
    return {r.out, r.lse};
  };
  const Shape shape = {1, n, heads, head_dim};
  const Tensors inputs = {Randn(shape, gen, DType::kFloat64),
                          Randn(shape, gen, DType::kFloat64),
                          Randn(shape, gen, DType::kFloat64)};
  // Pattern (4, 1, 0) selects every query, so every lse is finite and the
  // loss has no -inf term.
  for (double l : fn(inputs)[1].ToVector()) ASSERT_TRUE(std::isfinite(l));
  ExpectGradientsMatchFiniteDifferences(fn, inputs);
}

// Sliding windows (SPEC section 2, Windows) with every pattern type, causal
// and not, with tiles that split segments (5 x 7) and the default ones:
// forward and every gradient in float64 against the torch oracle, whose
// counts apply t - left <= u <= t + right independently of the library.
// Windows of 0 keep the diagonal only (or one side of it); (-1, -1) is no
// window.
TEST(AttentionTest, SlidingWindowsMatchTorchInFloat64) {
  Generator gen = TestGenerator();
  for (AttentionCase c : PatternCases(gen)) {
    for (auto [left, right] : {std::pair<int64_t, int64_t>{0, 0},
                               {0, -1},
                               {-1, 0},
                               {6, -1},
                               {-1, 3},
                               {10, 4}}) {
      for (bool causal : {false, true}) {
        for (auto [query_tile, key_tile] :
             {std::pair<int64_t, int64_t>{5, 7}, {128, 256}}) {
          c.options.causal = causal;
          c.options.window_left = left;
          c.options.window_right = right;
          c.options.query_tile = query_tile;
          c.options.key_tile = key_tile;
          SCOPED_TRACE("window (" + std::to_string(left) + ", " +
                       std::to_string(right) + ")");
          ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
        }
      }
    }
  }
}

// Soft-capping (SPEC section 2): scores become cap * tanh(s / cap) before
// the softmax, forward and gradients (the oracle differentiates tanh with
// torch autograd), alone and with a window, dropout and padding. Inputs are
// scaled by 3 so that scores reach the cap (tanh far from linear). float64,
// 1e-10 as above.
TEST(AttentionTest, SoftCappingMatchesTorchInFloat64) {
  Generator gen = TestGenerator();
  for (AttentionCase c : PatternCases(gen)) {
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      c.options.softcap = 2.5;
      c.options.query_tile = 5;
      c.options.key_tile = 7;
      Qkv in = RandomQkv(c, DType::kFloat64, gen);
      in.q = MulScalar(in.q, 3.0);
      in.k = MulScalar(in.k, 3.0);
      ExpectAttentionMatchesOracle(c, in);
      c.options.window_left = 9;
      c.options.window_right = 2;
      ExpectAttentionMatchesOracle(c, in);
      c.options.window_left = c.options.window_right = -1;
    }
  }
  AttentionCase c = Case("dense softcap dropout padded", 40, 2, DenseSpec());
  c.batch = 2;
  c.options.softcap = 1.5;
  c.options.dropout = 0.25;
  c.options.window_left = 7;
  c.call.key_padding_mask =
      FromVector(std::vector<double>(80, 0.0), {2, 40}, DType::kUInt8);
  Generator dropout_gen(11);
  c.call.generator = &dropout_gen;
  ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
}

// Analytic gradients through the soft-cap and a window against central
// differences in float64 (as DilatedCausalGradientsMatchFiniteDifferences).
TEST(AttentionTest, SoftCapAndWindowGradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  const int64_t n = 14, heads = 2, head_dim = 4;
  const AttentionPattern pattern = testing::DilatedHeads(
      *DilatedSpec({4, 8}, {1, 2}, HeadLayout::kAllHeads).dilated, heads);
  AttentionOptions options;
  options.causal = true;
  options.softcap = 1.7;
  options.window_left = 5;
  options.query_tile = 3;
  options.key_tile = 2;
  const OpFn fn = [&](const Tensors& in) -> Tensors {
    AttentionResult r = Attention(in[0], in[1], in[2], pattern, options);
    return {r.out, r.lse};
  };
  const Shape shape = {1, n, heads, head_dim};
  const Tensors inputs = {MulScalar(Randn(shape, gen, DType::kFloat64), 2.0),
                          MulScalar(Randn(shape, gen, DType::kFloat64), 2.0),
                          Randn(shape, gen, DType::kFloat64)};
  for (double l : fn(inputs)[1].ToVector()) ASSERT_TRUE(std::isfinite(l));
  ExpectGradientsMatchFiniteDifferences(fn, inputs);
}

// A window prunes whole tiles from the plan: with a narrow window a long
// dense sequence visits only the tiles along the diagonal band.
TEST(AttentionTest, WindowPrunesTilesOutsideTheBand) {
  TilePlanOptions options;
  options.query_tile = 16;
  options.key_tile = 16;
  const int64_t n = 256;
  const std::vector<DilatedPattern> dense = {DilatedPattern{n, 1, 0}};
  auto count = [&] {
    int64_t tiles = 0;
    ForEachTile(dense, n, {0, n}, {0, n}, options,
                [&](const Tile&) { ++tiles; });
    return tiles;
  };
  EXPECT_EQ(count(), 16 * 16);
  options.window_left = 20;
  options.window_right = 0;
  // Query tile i meets key tiles i - 2 .. i (20 tokens back reach two tiles
  // for the tile's first rows).
  EXPECT_EQ(count(), 16 + 15 + 14);
  options.window_left = 0;
  EXPECT_EQ(count(), 16);
}

// Bad windows and caps are errors naming the value.
TEST(AttentionTest, BadWindowOrSoftcapIsAClearError) {
  const Shape shape = {1, 8, 1, 4};
  const Tensor x = Zeros(shape, DType::kFloat32);
  AttentionPattern pattern;
  pattern.head_patterns = {{DilatedPattern{8, 1, 0}}};
  AttentionOptions options;
  options.window_left = -2;
  testing::ExpectError([&] { Attention(x, x, x, pattern, options); },
                       {"Attention: window (-2, -1)"});
  options.window_left = -1;
  options.softcap = -1;
  testing::ExpectError([&] { Attention(x, x, x, pattern, options); },
                       {"Attention: softcap -1"});
  options.softcap = std::numeric_limits<double>::infinity();
  testing::ExpectError([&] { Attention(x, x, x, pattern, options); },
                       {"Attention: softcap inf"});
}

// A uint8 [batch, n] mask with about a third of the keys padding; batch 1
// pads every key, and key 0 of batch 0 is padding, so causal query 0 of
// batch 0 has no key either.
Tensor PaddingMask(int64_t batch, int64_t n, Generator& gen) {
  std::vector<double> bits = Rand({batch, n}, gen).ToVector();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t u = 0; u < n; ++u) {
      double& bit = bits[b * n + u];
      bit = (b == 1 || u == 0 || bit < 0.33) ? 1 : 0;
    }
  }
  return FromVector(bits, {batch, n}, DType::kUInt8);
}

// Padding keys get no weight: the oracle with counts that exclude them
// matches, forward and gradients, for dense, dilated and block-sparse.
TEST(AttentionTest, KeyPaddingMaskMatchesTorch) {
  Generator gen = TestGenerator();
  std::vector<AttentionCase> cases;
  cases.push_back(Case("dense", 33, 2, DenseSpec()));
  cases.push_back(Case("all_heads", 41, 3,
                       DilatedSpec({8, 16}, {1, 2}, HeadLayout::kAllHeads)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 6);
  global.global_tokens = 4;
  global.window = 6;
  cases.push_back(Case("global_local", 39, 2, BlockSparseSpec(global)));
  for (AttentionCase c : cases) {
    c.batch = 3;
    c.call.key_padding_mask = PaddingMask(c.batch, c.n, gen);
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      c.options.query_tile = 5;
      c.options.key_tile = 7;
      ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
    }
  }
}

// A query whose every key is padding: out exactly 0, lse -inf, and finite
// gradients (zero for its q row) even with random gradients on out and lse.
TEST(AttentionTest, AllPaddingRowGivesZeroOutNegInfLseAndNoNaN) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("all_heads", 24, 2,
                         DilatedSpec({8, 12}, {1, 2}, HeadLayout::kAllHeads));
  c.call.key_padding_mask = PaddingMask(c.batch, c.n, gen);  // batch 1
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    SCOPED_TRACE(DTypeName(dtype));
    Qkv in = RandomQkv(c, dtype, gen);
    for (Tensor* t : {&in.q, &in.k, &in.v}) t->set_requires_grad(true);
    const AttentionResult r =
        Attention(in.q, in.k, in.v, c.pattern, c.options, c.call);
    Backward({r.out, r.lse}, {Randn(r.out.shape(), gen, dtype),
                              Randn(r.lse.shape(), gen, dtype)});
    const Tensor out1 = r.out.slice(0, 1, 2), lse1 = r.lse.slice(0, 1, 2);
    for (double x : out1.ToVector()) EXPECT_EQ(x, 0);
    for (double l : lse1.ToVector()) {
      EXPECT_TRUE(std::isinf(l) && l < 0) << l;
    }
    for (const Tensor* t : {&in.q, &in.k, &in.v}) {
      for (double g : t->grad().ToVector()) ASSERT_TRUE(std::isfinite(g));
    }
    for (double g : in.q.grad().slice(0, 1, 2).ToVector()) EXPECT_EQ(g, 0);
    // Batch 0 has real keys: its rows are not all zero.
    double norm = 0;
    for (double x : r.out.slice(0, 0, 1).ToVector()) norm += x * x;
    EXPECT_GT(norm, 0);
  }
}

// Dropout p = 0.3 from a fixed generator equals the oracle whose keep
// weights are DropoutKeepWeights at a copy of that generator's state,
// forward and gradients; ReferenceAttention draws the same mask. One offset
// is consumed per call.
TEST(AttentionTest, DropoutMatchesTorchWithKeepWeights) {
  Generator gen = TestGenerator();
  std::vector<AttentionCase> cases;
  cases.push_back(Case("all_heads", 40, 3,
                       DilatedSpec({8, 16}, {1, 2}, HeadLayout::kAllHeads)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 8);
  random.density = 0.4;
  random.seed = 3;
  cases.push_back(Case("random", 43, 2, BlockSparseSpec(random)));
  for (AttentionCase c : cases) {
    Generator dropout_gen(gen.NextOffset() * 7919 + 11);
    dropout_gen.set_offset(5);
    c.options.dropout = 0.3;
    c.call.generator = &dropout_gen;
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      c.options.query_tile = 5;
      c.options.key_tile = 7;
      const uint64_t offset = dropout_gen.offset();
      ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
      EXPECT_EQ(dropout_gen.offset(), offset + 1)
          << "Attention draws one offset per call";
    }
  }
}

// Dropout's stream is always named: a call without a generator is refused
// (no thread-default stream is drawn from behind the caller's back), and
// the generator's offset advances by one per call.
TEST(AttentionTest, DropoutNeedsAGeneratorAndDrawsOneOffsetPerCall) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("dense", 30, 2, DenseSpec());
  c.options.dropout = 0.25;
  const Qkv in = RandomQkv(c, DType::kFloat64, gen);
  const uint64_t default_offset = DefaultGenerator().offset();
  testing::ExpectError(
      [&] { Attention(in.q, in.k, in.v, c.pattern, c.options); },
      {"Attention: dropout 0.25 without a generator"});
  EXPECT_EQ(DefaultGenerator().offset(), default_offset);
  Generator dropout_gen(1234);
  c.call.generator = &dropout_gen;
  ExpectAttentionMatchesOracle(c, in);
  EXPECT_EQ(dropout_gen.offset(), 1u);
}

// The same generator state gives bit-identical out, lse and gradients; a
// different offset gives a different result (so the comparison can fail).
TEST(AttentionTest, DropoutIsDeterministicForAGeneratorState) {
  Generator gen = TestGenerator();
  AttentionCase c =
      Case("all_heads", 45, 3,
           DilatedSpec({8, 16, 32}, {1, 2, 4}, HeadLayout::kAllHeads));
  c.options.dropout = 0.3;
  c.options.causal = true;
  const Qkv in = RandomQkv(c, DType::kFloat32, gen);
  const Tensor grad_out = Randn(in.q.shape(), gen);
  auto run = [&](uint64_t offset) {
    Generator dropout_gen(99);
    dropout_gen.set_offset(offset);
    AttentionCallOptions call = c.call;
    call.generator = &dropout_gen;
    Tensors leaves;
    for (const Tensor* t : {&in.q, &in.k, &in.v}) {
      leaves.push_back(t->detach());
      leaves.back().set_requires_grad(true);
    }
    AttentionResult r =
        Attention(leaves[0], leaves[1], leaves[2], c.pattern, c.options, call);
    r.out.backward(grad_out);
    return Tensors{r.out, r.lse, leaves[0].grad(), leaves[1].grad(),
                   leaves[2].grad()};
  };
  const Tensors first = run(3), second = run(3), other = run(4);
  const char* names[] = {"out", "lse", "dq", "dk", "dv"};
  for (int i = 0; i < 5; ++i) {
    EXPECT_TRUE(BitwiseEqual(first[i], second[i])) << names[i];
  }
  EXPECT_FALSE(BitwiseEqual(first[0], other[0]))
      << "another offset must draw another dropout mask";
}

// The CUDA work lists (host code: built here, no GPU needed) for every
// pattern type, causal and not, over the whole sequence and over ring-like
// layouts (two query spans against two key spans), both kinds: every item
// has rows and at least one tile (the tensor-core kernels read an item's
// first tile before looking for one), every tile has rows, items sit in
// their pattern's range, and the pairs the kernels run (every pair of an
// item's rows with its tiles' rows, up to causality: block masks and
// dilation are whole tiles) are each pattern's allowed pairs of the two
// layouts, each once, as PairCounts counts them.
TEST(AttentionTest, CudaWorkListItemsHaveTilesAndCoverEveryPairOnce) {
  Generator gen = TestGenerator();
  for (AttentionCase c : PatternCases(gen)) {
    const int64_t n = c.n;
    const TokenLayout whole = TokenLayoutOf({PositionSpan{0, n}});
    const TokenLayout queries =
        TokenLayoutOf({PositionSpan{n / 5, n / 2}, PositionSpan{4 * n / 5, n}});
    const TokenLayout keys =
        TokenLayoutOf({PositionSpan{0, n / 3}, PositionSpan{2 * n / 3, n}});
    auto holds = [](const TokenLayout& layout, int64_t position) {
      for (const LocalSpan& s : layout.spans) {
        if (position >= s.begin && position < s.end) return true;
      }
      return false;
    };
    const Tensor q = Zeros({1, n, c.heads, 4});
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      const auto p = MakeAttentionProblem(SpecOf(q), n, c.pattern, c.options);
      const std::vector<double> counts =
          PairCounts(c.pattern, causal, Tensor(), 1, n).ToVector();
      for (const auto& [ql, kl] :
           {std::pair<const TokenLayout*, const TokenLayout*>{&whole, &whole},
            {&queries, &keys}}) {
        for (CudaWorkKind kind :
             {CudaWorkKind::kQueryItems, CudaWorkKind::kKeyItems}) {
          const bool by_query = kind == CudaWorkKind::kQueryItems;
          SCOPED_TRACE(absl::StrCat(c.name, causal ? " causal" : "",
                                    ql == &whole ? " whole" : " spans",
                                    by_query ? " query items" : " key items"));
          const CudaWorkListHost list = BuildCudaWorkList(*p, *ql, *kl, kind);
          ASSERT_EQ(static_cast<int64_t>(list.pattern_begin.size()),
                    p->max_patterns + 1);
          ASSERT_EQ(list.pattern_begin.back(),
                    static_cast<int64_t>(list.items.size()));
          std::vector<double> runs(counts.size(), 0);
          for (size_t i = 0; i < list.items.size(); ++i) {
            const CudaWorkItem& item = list.items[i];
            ASSERT_GT(item.rows.count, 0) << "item " << i;
            ASSERT_LT(item.first, item.last) << "item " << i << " has no tiles";
            ASSERT_LE(item.last, static_cast<int64_t>(list.tiles.size()));
            EXPECT_GE(static_cast<int64_t>(i),
                      list.pattern_begin[item.pattern]);
            EXPECT_LT(static_cast<int64_t>(i),
                      list.pattern_begin[item.pattern + 1]);
            for (int32_t j = item.first; j < item.last; ++j) {
              const CudaTileRows& tile = list.tiles[j];
              ASSERT_GT(tile.count, 0) << "tile " << j;
              for (int32_t a = 0; a < item.rows.count; ++a) {
                for (int32_t b = 0; b < tile.count; ++b) {
                  const int64_t own =
                      item.rows.position + a * item.rows.position_step;
                  const int64_t other = tile.position + b * tile.position_step;
                  const int64_t t = by_query ? own : other;
                  const int64_t u = by_query ? other : own;
                  if (causal && u > t) continue;
                  runs[(item.head * n + t) * n + u] += 1;
                }
              }
            }
          }
          int64_t wrong = 0;
          for (int64_t h = 0; h < c.heads; ++h) {
            for (int64_t t = 0; t < n; ++t) {
              for (int64_t u = 0; u < n; ++u) {
                const int64_t at = (h * n + t) * n + u;
                const double want =
                    holds(*ql, t) && holds(*kl, u) ? counts[at] : 0;
                wrong += runs[at] != want;
              }
            }
          }
          EXPECT_EQ(wrong, 0);
        }
      }
    }
  }
}

// Tile order is scheduling only: Hilbert and row-major give the same out,
// lse and gradients up to float32 reassociation, with tiny tiles so that
// every head has dozens of tiles. The plans visit the same set of tiles in a
// different order.
TEST(AttentionTest, HilbertAndRowMajorTileOrdersAgree) {
  Generator gen = TestGenerator();
  std::vector<AttentionCase> cases;
  const int64_t n = 61;
  BlockSparseOptions local = Sparse(SparsePattern::kLocalWindow, 4);
  local.window = 12;
  cases.push_back(Case("local_window", n, 2, BlockSparseSpec(local)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 4);
  global.global_tokens = 5;
  global.window = 4;
  cases.push_back(Case("global_local", n, 2, BlockSparseSpec(global)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 4);
  random.density = 0.5;
  random.seed = 11;
  cases.push_back(Case("random", n, 2, BlockSparseSpec(random)));
  cases.push_back(
      Case("all_heads", n, 3,
           DilatedSpec({16, 32, 64}, {1, 2, 4}, HeadLayout::kAllHeads)));
  for (AttentionCase c : cases) {
    for (bool causal : {false, true}) {
      SCOPED_TRACE(c.name + (causal ? " causal" : ""));
      c.options.causal = causal;
      c.options.query_tile = 2;
      c.options.key_tile = 3;
      const Qkv in = RandomQkv(c, DType::kFloat32, gen);
      const Tensor grad_out = Randn(in.q.shape(), gen);
      auto run = [&](TileOrder order) {
        AttentionOptions options = c.options;
        options.tile_order = order;
        Tensors leaves;
        for (const Tensor* t : {&in.q, &in.k, &in.v}) {
          leaves.push_back(t->detach());
          leaves.back().set_requires_grad(true);
        }
        AttentionResult r =
            Attention(leaves[0], leaves[1], leaves[2], c.pattern, options);
        r.out.backward(grad_out);
        return Tensors{r.out, r.lse, leaves[0].grad(), leaves[1].grad(),
                       leaves[2].grad()};
      };
      const Tensors row_major = run(TileOrder::kRowMajor);
      const Tensors hilbert = run(TileOrder::kHilbert);
      // The two orders sum the same terms in a different order, so they
      // differ by float32 rounding of the terms (~1e-7 x their size, over
      // dozens of merges and tiles), and a gradient entry can be a
      // near-cancelling sum of O(1) terms: the bound is float32's 1e-5
      // relative to the tensor's largest entry, not to each entry.
      const char* names[] = {"out", "lse", "dq", "dk", "dv"};
      for (int i = 0; i < 5; ++i) {
        const Tolerance tol = ScaledTolerance(row_major[i], DType::kFloat32);
        if (i == 1) {
          ExpectLseClose(hilbert[i], row_major[i], tol, names[i]);
        } else {
          ExpectAllClose(hilbert[i], row_major[i], tol, names[i]);
        }
      }

      // Same tiles, different order (for head 0).
      using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int>;
      auto plan = [&](TileOrder order) {
        TilePlanOptions plan_options;
        plan_options.causal = causal;
        plan_options.block_mask = c.pattern.block_mask.get();
        plan_options.query_tile = c.options.query_tile;
        plan_options.key_tile = c.options.key_tile;
        plan_options.order = order;
        std::vector<Key> tiles;
        ForEachTile(c.pattern.head_patterns[0], n, {0, n}, {0, n}, plan_options,
                    [&](const Tile& t) {
                      tiles.emplace_back(t.q.position, t.q.count, t.k.position,
                                         t.k.count, t.pattern);
                    });
        return tiles;
      };
      const std::vector<Key> a = plan(TileOrder::kRowMajor);
      const std::vector<Key> b = plan(TileOrder::kHilbert);
      EXPECT_GT(a.size(), 20u);
      EXPECT_EQ(std::multiset<Key>(a.begin(), a.end()),
                std::multiset<Key>(b.begin(), b.end()));
      EXPECT_NE(a, b) << "the Hilbert order should differ from row-major";
    }
  }
}

// With a block mask, the row-major plan visits only the on blocks' tiles
// (walking the mask's rows): it must list exactly the tiles the Hilbert
// walk (which visits every cell and asks the mask) lists, in row-major
// order. Masks of 149 blocks (not a multiple of 8), several key
// tiles per block, dilated rows, causal or not, and query and key ranges
// apart (a ring step).
TEST(AttentionTest, BlockMaskPlansVisitExactlyTheOnBlocksInRowMajorOrder) {
  const int64_t n = 2373, block_size = 16;
  const int64_t blocks = (n + block_size - 1) / block_size;  // 149
  for (double density : {0.03, 0.3, 1.0}) {
    Generator gen(static_cast<uint64_t>(density * 1000) + 7);
    const std::vector<double> draws =
        Rand({blocks, blocks}, gen, DType::kFloat64).ToVector();
    const BlockMask mask = BlockMask::FromPairs(
        block_size, blocks,
        [&](int64_t i, int64_t j) { return draws[i * blocks + j] < density; });
    for (const DilatedPattern& pattern :
         {DilatedPattern{n, 1, 0}, DilatedPattern{n, 2, 1},
          DilatedPattern{512, 1, 0}}) {
      for (bool causal : {false, true}) {
        for (const auto& [queries, keys] :
             {std::make_pair(PositionSpan{0, n}, PositionSpan{0, n}),
              std::make_pair(PositionSpan{700, 1500},
                             PositionSpan{100, 2300})}) {
          SCOPED_TRACE(absl::StrCat("density ", density, " w ",
                                    pattern.segment_length, " r ",
                                    pattern.dilation_rate, " causal ", causal,
                                    " queries from ", queries.begin));
          using Key = std::tuple<int64_t, int64_t, int64_t, int64_t>;
          auto plan = [&](TileOrder order) {
            TilePlanOptions options;
            options.causal = causal;
            options.block_mask = &mask;
            options.query_tile = 32;
            options.key_tile = 5;  // several tiles per block
            options.order = order;
            std::vector<Key> tiles;
            ForEachTile({pattern}, n, queries, keys, options,
                        [&](const Tile& t) {
                          tiles.emplace_back(t.q.position, t.q.count,
                                             t.k.position, t.k.count);
                        });
            return tiles;
          };
          const std::vector<Key> row_major = plan(TileOrder::kRowMajor);
          std::vector<Key> hilbert = plan(TileOrder::kHilbert);
          EXPECT_FALSE(row_major.empty());
          // One segment, or segments in order: row-major is the sorted list.
          std::sort(hilbert.begin(), hilbert.end());
          EXPECT_EQ(row_major, hilbert);
          for (const Key& k : row_major) {
            EXPECT_TRUE(mask.on(std::get<0>(k) / block_size,
                                std::get<2>(k) / block_size));
          }
        }
      }
    }
  }
}

// HilbertCell walks a side x side grid through every cell once, each step
// to an edge-adjacent cell.
TEST(AttentionTest, HilbertCellVisitsEveryCellOnceAlongAdjacentSteps) {
  for (int64_t side : {1, 2, 4, 8, 16}) {
    SCOPED_TRACE("side " + std::to_string(side));
    std::set<std::pair<int64_t, int64_t>> seen;
    int64_t px = 0, py = 0;
    for (int64_t d = 0; d < side * side; ++d) {
      int64_t x = -1, y = -1;
      HilbertCell(side, d, &x, &y);
      ASSERT_GE(x, 0);
      ASSERT_LT(x, side);
      ASSERT_GE(y, 0);
      ASSERT_LT(y, side);
      EXPECT_TRUE(seen.insert({x, y}).second)
          << "cell (" << x << ", " << y << ") visited twice at d = " << d;
      if (d > 0) {
        EXPECT_EQ(std::abs(x - px) + std::abs(y - py), 1)
            << "step " << d << " from (" << px << ", " << py << ") to (" << x
            << ", " << y << ")";
      }
      px = x;
      py = y;
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), side * side);
  }
}

// Non-contiguous q, k, v (strided views) give the same result as
// contiguous copies.
TEST(AttentionTest, NonContiguousInputsMatchTorch) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("head_groups", 29, 3,
                         DilatedSpec({8, 16}, {1, 2}, HeadLayout::kHeadGroups));
  c.options.causal = true;
  for (testing::StridedLayout layout : testing::kStridedLayouts) {
    SCOPED_TRACE(testing::StridedLayoutName(layout));
    Qkv in = RandomQkv(c, DType::kFloat64, gen);
    in.q = testing::NonContiguousCopy(in.q, layout);
    in.k = testing::NonContiguousCopy(in.k, layout);
    in.v = testing::NonContiguousCopy(in.v, layout);
    ExpectAttentionMatchesOracle(c, in);
  }
}

// An explicit scale replaces 1 / sqrt(head_dim).
TEST(AttentionTest, ExplicitScaleMatchesTorch) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("dense", 21, 2, DenseSpec());
  c.options.scale = 0.71;
  ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
}

// The mask MakeBlockMask builds for `options` over n tokens, one string of
// '0'/'1' per query block.
std::vector<std::string> MaskRows(const BlockSparseOptions& options,
                                  int64_t n) {
  absl::StatusOr<BlockMask> mask = MakeBlockMask(options, n);
  EXPECT_TRUE(mask.ok()) << mask.status();
  std::vector<std::string> rows;
  if (!mask.ok()) return rows;
  for (int64_t q = 0; q < mask->num_blocks(); ++q) {
    std::string row;
    for (int64_t k = 0; k < mask->num_blocks(); ++k) {
      row += mask->on(q, k) ? '1' : '0';
    }
    rows.push_back(row);
  }
  return rows;
}

// Hand-written masks for n = 45 in blocks of 8: 6 blocks, the last of 5
// tokens. A window of w tokens reaches the blocks that hold a token within w
// tokens of the query block: none beyond the diagonal for w = 0, the
// neighbours for 1 <= w <= 8, two blocks each way for 9 <= w <= 16.
TEST(BlockMaskTest, LocalWindowRoundsTokensOutToBlocks) {
  BlockSparseOptions o = Sparse(SparsePattern::kLocalWindow, 8);
  o.window = 0;
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"100000", "010000", "001000", "000100",
                                      "000010", "000001"}));
  o.window = 8;
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"110000", "111000", "011100", "001110",
                                      "000111", "000011"}));
  o.window = 9;
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"111000", "111100", "111110", "011111",
                                      "001111", "000111"}));
}

TEST(BlockMaskTest, DilatedSparseKeepsBlocksAtMultiplesOfTheStride) {
  BlockSparseOptions o = Sparse(SparsePattern::kDilatedSparse, 8);
  o.stride = 2;
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"101010", "010101", "101010", "010101",
                                      "101010", "010101"}));
  o.stride = 3;
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"100100", "010010", "001001", "100100",
                                      "010010", "001001"}));
}

// global_tokens = 9: token 8 lies in block 1, so blocks 0 and 1 are global
// (whole rows and columns on), plus the window of 8 tokens (neighbours).
TEST(BlockMaskTest, GlobalLocalRoundsGlobalTokensOutToBlocks) {
  BlockSparseOptions o = Sparse(SparsePattern::kGlobalLocal, 8);
  o.global_tokens = 9;
  o.window = 8;
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"111111", "111111", "111100", "111110",
                                      "110111", "110011"}));
  o.window = 0;
  o.global_tokens = 8;  // block 0 only
  EXPECT_EQ(MaskRows(o, 45),
            (std::vector<std::string>{"111111", "110000", "101000", "100100",
                                      "100010", "100001"}));
}

// Random masks: the same seed gives the same mask, another seed another;
// the diagonal is always on; the off-diagonal density is within 6 standard
// deviations of the target (binomial: 64 blocks, 4032 off-diagonal pairs,
// sd = sqrt(p (1 - p) / 4032) ~ 0.0072 at p = 0.3); density 0 and 1 give
// the diagonal only and everything.
TEST(BlockMaskTest, RandomMaskIsSeededWithTheTargetDensity) {
  const int64_t n = 64 * 8 - 3;  // 64 blocks, the last short
  BlockSparseOptions o = Sparse(SparsePattern::kRandom, 8);
  o.density = 0.3;
  o.seed = 41;
  const std::vector<std::string> a = MaskRows(o, n), b = MaskRows(o, n);
  ASSERT_EQ(a.size(), 64u);
  EXPECT_EQ(a, b);
  o.seed = 42;
  EXPECT_NE(MaskRows(o, n), a);
  int64_t on = 0;
  for (int64_t q = 0; q < 64; ++q) {
    EXPECT_EQ(a[q][q], '1') << "diagonal block " << q;
    for (int64_t k = 0; k < 64; ++k) on += k != q && a[q][k] == '1';
  }
  const double pairs = 64 * 63;
  const double sd = std::sqrt(0.3 * 0.7 / pairs);
  EXPECT_NEAR(on / pairs, 0.3, 6 * sd);
  o.density = 0;
  for (int64_t q = 0; q < 64; ++q) {
    std::string diagonal(64, '0');
    diagonal[q] = '1';
    EXPECT_EQ(MaskRows(o, n)[q], diagonal);
  }
  o.density = 1;
  for (const std::string& row : MaskRows(o, n)) {
    EXPECT_EQ(row, std::string(64, '1'));
  }
}

// An explicit mask passes unchanged, even with diagonal blocks off.
TEST(BlockMaskTest, ExplicitMaskPassesUnchanged) {
  BlockSparseOptions o = Sparse(SparsePattern::kExplicit, 8);
  const std::vector<std::string> rows = {"010000", "000000", "111111",
                                         "100001", "001100", "000010"};
  for (const std::string& row : rows) {
    for (char c : row) o.explicit_mask.push_back(c == '1');
  }
  EXPECT_EQ(MaskRows(o, 45), rows);
}

// The compressed rows answer every question the dense matrix would.
TEST(BlockMaskTest, CompressedRowsAnswerLikeTheDenseMatrix) {
  const int64_t block = 4, blocks = 7;
  auto rule = [](int64_t q, int64_t k) { return (q + 2 * k) % 3 == 0; };
  const BlockMask mask = BlockMask::FromPairs(block, blocks, rule);
  const std::vector<uint8_t> dense = mask.ToDense();
  ASSERT_EQ(dense.size(), static_cast<size_t>(blocks * blocks));
  int64_t on = 0;
  for (int64_t q = 0; q < blocks; ++q) {
    std::vector<int32_t> expected;
    for (int64_t k = 0; k < blocks; ++k) {
      EXPECT_EQ(mask.on(q, k), rule(q, k)) << q << ", " << k;
      EXPECT_EQ(dense[q * blocks + k], rule(q, k) ? 1 : 0);
      if (rule(q, k)) expected.push_back(static_cast<int32_t>(k));
    }
    const absl::Span<const int32_t> row = mask.Row(q);
    EXPECT_EQ(std::vector<int32_t>(row.begin(), row.end()), expected);
    on += static_cast<int64_t>(expected.size());
  }
  EXPECT_EQ(mask.OnPairs(), on);
  EXPECT_DOUBLE_EQ(mask.Density(), static_cast<double>(on) / (blocks * blocks));
  for (int64_t t = 0; t < block * blocks; t += 3) {
    for (int64_t u = 0; u < block * blocks; u += 5) {
      EXPECT_EQ(mask.Allows(t, u), rule(t / block, u / block));
    }
  }
}

TEST(BlockMaskTest, RowsOutOfOrderOrRangeAreAnInternalError) {
  auto build = [](std::vector<int32_t> row) {
    return BlockMask(4, 3, [&](int64_t, std::vector<int32_t>* keys) {
      keys->insert(keys->end(), row.begin(), row.end());
    });
  };
  EXPECT_EQ(build({0, 2}).OnPairs(), 6);
  EXPECT_DEATH(build({1, 1}), "increasing blocks below 3");
  EXPECT_DEATH(build({2, 0}), "increasing blocks below 3");
  EXPECT_DEATH(build({3}), "key block 3");
}

// The test's transcription (SpecBlockMask) agrees with every hand-written
// mask above by construction of the same rules; here it is checked against
// MakeBlockMask over a sweep of options, so the oracle and the code under
// test cannot drift apart unnoticed.
TEST(BlockMaskTest, MakeBlockMaskEqualsTheSpecTranscription) {
  for (int64_t n : {1, 7, 8, 45, 64}) {
    for (int64_t block : {1, 3, 8}) {
      for (SparsePattern pattern :
           {SparsePattern::kLocalWindow, SparsePattern::kGlobalLocal,
            SparsePattern::kDilatedSparse, SparsePattern::kRandom}) {
        for (int64_t knob : {0, 1, 5, 9, 17}) {
          BlockSparseOptions o = Sparse(pattern, block);
          o.window = knob;
          o.global_tokens = knob;
          o.stride = knob + 1;
          o.density = knob / 20.0;
          o.seed = knob;
          SCOPED_TRACE(absl::StrCat("n ", n, " block ", block, " pattern ",
                                    static_cast<int>(pattern), " knob ", knob));
          absl::StatusOr<BlockMask> mask = MakeBlockMask(o, n);
          ASSERT_TRUE(mask.ok()) << mask.status();
          EXPECT_EQ(mask->ToDense(), testing::SpecBlockMask(o, n));
        }
      }
    }
  }
}

// All heads: 5 heads over w {8, 16, 32}, r {1, 2, 4}: head j has (8, 1, 0),
// (16, 2, j mod 2), (32, 4, j mod 4).
TEST(DilatedHeadPatternsTest, AllHeadsOffsetsAreHeadModRate) {
  DilatedOptions o =
      *DilatedSpec({8, 16, 32}, {1, 2, 4}, HeadLayout::kAllHeads).dilated;
  absl::StatusOr<std::vector<std::vector<DilatedPattern>>> heads =
      DilatedHeadPatterns(o, 5);
  ASSERT_TRUE(heads.ok()) << heads.status();
  const std::vector<std::vector<std::vector<int64_t>>> want = {
      {{8, 1, 0}, {16, 2, 0}, {32, 4, 0}},
      {{8, 1, 0}, {16, 2, 1}, {32, 4, 1}},
      {{8, 1, 0}, {16, 2, 0}, {32, 4, 2}},
      {{8, 1, 0}, {16, 2, 1}, {32, 4, 3}},
      {{8, 1, 0}, {16, 2, 0}, {32, 4, 0}}};
  ASSERT_EQ(heads->size(), want.size());
  for (size_t j = 0; j < want.size(); ++j) {
    std::vector<std::vector<int64_t>> got;
    for (const DilatedPattern& p : (*heads)[j]) {
      got.push_back({p.segment_length, p.dilation_rate, p.offset});
    }
    EXPECT_EQ(got, want[j]) << "head " << j;
  }
}

// ReferenceAttention's PairCounts (attention/) equals the test's own counts
// from the options for every pattern case, causal and not: the readable
// reference and the oracle agree on which pairs are allowed how often.
TEST(AttentionTest, PairCountsEqualTheSpecTranscription) {
  Generator gen = TestGenerator();
  for (AttentionCase c : PatternCases(gen)) {
    for (bool causal : {false, true}) {
      SCOPED_TRACE(c.name + (causal ? " causal" : ""));
      c.options.causal = causal;
      const Tensor counts =
          PairCounts(c.pattern, causal, Tensor(), c.batch, c.n);
      EXPECT_TRUE(BitwiseEqual(counts, testing::WeightsFor(c, gen).counts));
    }
  }
}

// The joint softmax of two partial results in float64, from their lse:
// lse = log(e^lse1 + e^lse2), out = (e^lse1 o1 + e^lse2 o2) / e^lse, with
// exponents shifted by the larger lse so nothing overflows.
void JointSoftmax(const std::vector<double>& o1, double lse1,
                  const std::vector<double>& o2, double lse2,
                  std::vector<double>* out, double* lse) {
  const double m = std::max(lse1, lse2);
  const double w1 = std::exp(lse1 - m), w2 = std::exp(lse2 - m);
  *lse = m + std::log(w1 + w2);
  out->resize(o1.size());
  for (size_t c = 0; c < o1.size(); ++c) {
    (*out)[c] = (w1 * o1[c] + w2 * o2[c]) / (w1 + w2);
  }
}

// float32 merges whose exponentials overflow float32 (e^100 > 3.4e38) stay
// finite and equal the float64 joint softmax to float32 rounding, in both
// orders; equal lse averages the outputs and adds log 2.
TEST(MergeAttentionRowTest, Float32MergeDoesNotOverflow) {
  const std::vector<double> o1 = {1.5, -2.0, 0.25}, o2 = {-0.5, 3.0, 8.0};
  for (auto [lse1, lse2] : {std::pair<double, double>{80, 100},
                            {100, 80},
                            {-100, -80},
                            {50, 50},
                            {3e4, 3e4 + 1}}) {
    SCOPED_TRACE(absl::StrCat("lse1 ", lse1, " lse2 ", lse2));
    std::vector<float> out(o1.begin(), o1.end());
    const std::vector<float> other(o2.begin(), o2.end());
    float lse = static_cast<float>(lse1);
    MergeAttentionRow<float>(out.data(), &lse, other.data(),
                             static_cast<float>(lse2), 3);
    std::vector<double> want;
    double want_lse = 0;
    JointSoftmax(o1, lse1, o2, lse2, &want, &want_lse);
    EXPECT_NEAR(lse, want_lse, 1e-6 * std::abs(want_lse) + 1e-6);
    for (int c = 0; c < 3; ++c) {
      ASSERT_TRUE(std::isfinite(out[c]));
      EXPECT_NEAR(out[c], want[c], 1e-6 * 8) << "element " << c;
    }
    if (lse1 == lse2) {
      EXPECT_NEAR(lse, lse1 + std::log(2.0), 1e-5);
      for (int c = 0; c < 3; ++c) {
        EXPECT_NEAR(out[c], (o1[c] + o2[c]) / 2, 1e-6);
      }
    }
  }
}

// An empty side (lse = -inf, out = 0) leaves the other side as it is; two
// empty sides stay empty (-inf, zeros), with no NaN.
TEST(MergeAttentionRowTest, EmptySidesMergeExactly) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> values = {1.5f, -2.0f, 0.25f};
  const std::vector<float> zeros = {0, 0, 0};
  {
    std::vector<float> out = values;
    float lse = 7;
    MergeAttentionRow<float>(out.data(), &lse, zeros.data(), -inf, 3);
    EXPECT_EQ(lse, 7);
    EXPECT_EQ(out, values);
  }
  {
    std::vector<float> out = zeros;
    float lse = -inf;
    MergeAttentionRow<float>(out.data(), &lse, values.data(), 7, 3);
    EXPECT_EQ(lse, 7);
    EXPECT_EQ(out, values);
  }
  for (bool float64 : {false, true}) {
    SCOPED_TRACE(float64 ? "float64" : "float32");
    if (float64) {
      std::vector<double> out = {0, 0, 0};
      const std::vector<double> other = {0, 0, 0};
      double lse = -std::numeric_limits<double>::infinity();
      MergeAttentionRow<double>(out.data(), &lse, other.data(), lse, 3);
      EXPECT_TRUE(std::isinf(lse) && lse < 0) << lse;
      EXPECT_EQ(out, other);
    } else {
      std::vector<float> out = zeros;
      float lse = -inf;
      MergeAttentionRow<float>(out.data(), &lse, zeros.data(), -inf, 3);
      EXPECT_TRUE(std::isinf(lse) && lse < 0) << lse;
      EXPECT_EQ(out, zeros);
    }
  }
}

// A side with lse +inf (a row with a +inf score: out NaN) keeps the merge
// at lse +inf with out NaN whatever the other side is, as the float64
// oracle's logsumexp over the union; two +inf sides once gave lse NaN
// (+inf - +inf).
TEST(MergeAttentionRowTest, PlusInfSidesStayPlusInf) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> finite = {1.5f, -2.0f, 0.25f};
  const std::vector<float> nans = {nan, nan, nan};
  for (auto [lse1, lse2] :
       {std::pair<float, float>{inf, inf}, {inf, 3}, {3, inf}, {-inf, inf}}) {
    SCOPED_TRACE(absl::StrCat("lse1 ", lse1, " lse2 ", lse2));
    std::vector<float> out = lse1 == inf ? nans : finite;
    if (lse1 == -inf) out = {0, 0, 0};
    float lse = lse1;
    MergeAttentionRow<float>(
        out.data(), &lse, lse2 == inf ? nans.data() : finite.data(), lse2, 3);
    EXPECT_EQ(lse, inf);
    for (float x : out) EXPECT_TRUE(std::isnan(x)) << x;
  }
}

// float32 attention with scores of size ~500 (q, k ~ N(0, 500), so
// s = q.k / sqrt(d) has standard deviation 500 and e^s overflows float32 by
// far): out, lse and every gradient are finite and match the float64 torch
// oracle on the same (float32-representable) inputs. Tolerance: the float32
// scores carry rounding ~6e-8 x sum |q_i k_i| / sqrt(d) ~ 1e-4 absolute,
// which becomes ~1e-4 relative error in each probability, so outputs and
// gradients get 1e-3 relative to the largest entry of each tensor (gradient
// entries are sums of terms of that size that may cancel) and lse (~500)
// 1e-3 absolute.
TEST(AttentionTest, Float32WithScoresNear500MatchesFloat64) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("all_heads", 40, 3,
                         DilatedSpec({8, 16}, {1, 2}, HeadLayout::kAllHeads));
  c.options.causal = true;
  c.options.query_tile = 5;
  c.options.key_tile = 7;
  const double sd = std::sqrt(500.0);
  const Shape shape = {c.batch, c.n, c.heads, c.head_dim};
  auto scaled = [&](double factor) {
    std::vector<double> x = Randn(shape, gen, DType::kFloat64).ToVector();
    for (double& e : x) e *= factor;
    Tensor t = FromVector(x, shape, DType::kFloat32);
    t.set_requires_grad(true);
    return t;
  };
  const Tensor q = scaled(sd), k = scaled(sd), v = scaled(1);
  const AttentionResult r = Attention(q, k, v, c.pattern, c.options, c.call);
  double largest_score = 0;
  for (double l : r.lse.ToVector()) {
    ASSERT_TRUE(std::isfinite(l))
        << "pattern (8, 1, 0) gives every query a key";
    largest_score = std::max(largest_score, std::abs(l));
  }
  EXPECT_GT(largest_score, 500);
  const Tensor grad_out = Randn(r.out.shape(), gen);
  const Tensor grad_lse = Randn(r.lse.shape(), gen);
  Backward({r.out, r.lse}, {grad_out, grad_lse});

  const testing::OracleWeights w = testing::WeightsFor(c, gen);
  testing::OracleAttrs attrs;
  attrs.numbers["scale"] = 1 / std::sqrt(static_cast<double>(c.head_dim));
  const testing::OracleResult want =
      testing::RunTorchOp("masked_attention", {q, k, v, w.counts, w.keep},
                          attrs, {grad_out, grad_lse});
  const Tensors got = {r.out, q.grad(), k.grad(), v.grad()};
  const Tensors expected = {want.outputs[0], want.input_grads[0],
                            want.input_grads[1], want.input_grads[2]};
  const char* names[] = {"out", "dq", "dk", "dv"};
  for (int i = 0; i < 4; ++i) {
    for (double x : got[i].ToVector()) {
      ASSERT_TRUE(std::isfinite(x)) << names[i];
    }
    double largest = 0;
    for (double x : expected[i].ToVector()) {
      largest = std::max(largest, std::abs(x));
    }
    ExpectAllClose(got[i], expected[i], Tolerance{1e-3, 1e-3 * largest},
                   names[i]);
  }
  ExpectAllClose(r.lse, want.outputs[1], Tolerance{0, 1e-3}, "lse");
}

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// DilatedPattern::Within(n) allows exactly the pattern's pairs among
// positions below n, for segments and rates above n up to INT64_MAX, with w
// <= n and r <= n + 1 (so the kernels' position arithmetic cannot
// overflow).
TEST(DilatedHeadPatternsTest, WithinKeepsThePairsBelowN) {
  const int64_t n = 13;
  for (int64_t w : {int64_t{1}, int64_t{5}, n, n + 1, kInt64Max}) {
    for (int64_t r :
         {int64_t{1}, int64_t{3}, int64_t{5}, int64_t{6}, n + 1, kInt64Max}) {
      for (int64_t o :
           {int64_t{0}, int64_t{2}, int64_t{4}, int64_t{5}, n, kInt64Max - 1}) {
        if (o >= r) continue;
        const DilatedPattern p{w, r, o};
        const DilatedPattern within = p.Within(n);
        SCOPED_TRACE(absl::StrCat("w ", w, " r ", r, " o ", o));
        EXPECT_LE(within.segment_length, n);
        EXPECT_LE(within.dilation_rate, n + 1);
        EXPECT_TRUE(within.offset >= 0 && within.offset < within.dilation_rate);
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t u = 0; u < n; ++u) {
            ASSERT_EQ(within.Allows(t, u), p.Allows(t, u))
                << "t " << t << " u " << u;
          }
        }
      }
    }
  }
}

// Segment lengths and dilation rates up to INT64_MAX are valid (SPEC
// section 2: w, r >= 1, offsets g mod r or j mod r): a rate above w selects
// t mod w == o alone, a segment above n is the whole sequence. Forward and
// gradients match the oracle, with small tiles (the kernels once overflowed
// on (x + r - 1) / r and gave every row lse -inf).
TEST(AttentionTest, SegmentLengthsAndRatesNearInt64MaxMatchTorch) {
  Generator gen = TestGenerator();
  for (HeadLayout layout : {HeadLayout::kHeadGroups, HeadLayout::kAllHeads}) {
    for (bool causal : {false, true}) {
      AttentionCase c =
          Case(layout == HeadLayout::kHeadGroups ? "head_groups" : "all_heads",
               21, 4,
               DilatedSpec({kInt64Max, 6, kInt64Max}, {kInt64Max, kInt64Max, 2},
                           layout));
      c.options.causal = causal;
      c.options.query_tile = 3;
      c.options.key_tile = 4;
      ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
    }
  }
}

// A block_size above n is one block of n tokens, whatever the pattern (the
// block count once overflowed to a [0, 0] mask, every row empty); a
// window, stride or global_tokens near INT64_MAX reaches every block (they
// once overflowed to an empty window or key blocks past the end).
TEST(BlockMaskTest, ValuesNearInt64MaxMatchTheSpecTranscription) {
  const int64_t n = 45;
  for (SparsePattern pattern :
       {SparsePattern::kLocalWindow, SparsePattern::kGlobalLocal,
        SparsePattern::kDilatedSparse, SparsePattern::kRandom}) {
    SCOPED_TRACE(static_cast<int>(pattern));
    absl::StatusOr<BlockMask> one =
        MakeBlockMask(Sparse(pattern, kInt64Max), n);
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_EQ(one->block_size(), n);
    EXPECT_EQ(one->ToDense(), std::vector<uint8_t>{1});
    BlockSparseOptions o = Sparse(pattern, 4);
    o.window = kInt64Max;
    o.stride = kInt64Max;
    o.global_tokens = kInt64Max;
    absl::StatusOr<BlockMask> mask = MakeBlockMask(o, n);
    ASSERT_TRUE(mask.ok()) << mask.status();
    EXPECT_EQ(mask->ToDense(), testing::SpecBlockMask(o, n));
  }
}

// Attention under those masks matches the oracle: a block above n as the
// one block of n tokens, and a window or stride near INT64_MAX as written.
TEST(AttentionTest, BlockSparseValuesNearInt64MaxMatchTorch) {
  Generator gen = TestGenerator();
  const int64_t n = 45;
  AttentionCase one_block =
      Case("block_size INT64_MAX", n, 2,
           BlockSparseSpec(Sparse(SparsePattern::kLocalWindow, n)));
  one_block.pattern.block_mask = std::make_shared<const BlockMask>(
      *MakeBlockMask(Sparse(SparsePattern::kLocalWindow, kInt64Max), n));
  BlockSparseOptions window = Sparse(SparsePattern::kLocalWindow, 8);
  window.window = kInt64Max;
  BlockSparseOptions stride = Sparse(SparsePattern::kDilatedSparse, 8);
  stride.stride = kInt64Max;
  for (AttentionCase c :
       {one_block, Case("window INT64_MAX", n, 2, BlockSparseSpec(window)),
        Case("stride INT64_MAX", n, 2, BlockSparseSpec(stride))}) {
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
    }
  }
}

// q, k, v of c in `dtype` with column 0 of q and k positive, then +inf in
// column 0 of key u of batch 0 and of query t of batch 1: the scores of
// batch 0's pairs (., u) and batch 1's pairs (t, .) are +inf where allowed,
// and none is NaN (+inf times a positive number).
Qkv InputsWithInf(const AttentionCase& c, DType dtype, int64_t u, int64_t t,
                  Generator& gen) {
  Qkv in = RandomQkv(c, DType::kFloat64, gen);
  auto edit = [&](Tensor* x, int64_t batch, int64_t position) {
    std::vector<double> d = x->ToVector();
    for (size_t i = 0; i < d.size(); i += c.head_dim) d[i] = std::abs(d[i]);
    for (int64_t h = 0; h < c.heads; ++h) {
      d[((batch * c.n + position) * c.heads + h) * c.head_dim] =
          std::numeric_limits<double>::infinity();
    }
    *x = FromVector(d, x->shape(), dtype);
  };
  edit(&in.k, 0, u);
  edit(&in.q, 1, t);
  in.v = in.v.to(dtype);
  return in;
}

// actual against the float64 oracle's `expected` where either may be
// non-finite: NaN exactly where expected is NaN, the same infinity where it
// is infinite, within `tol` elsewhere. Counts NaN and -inf entries.
void ExpectSameNonFinite(const Tensor& actual, const Tensor& expected,
                         Tolerance tol, const std::string& what, int64_t* nans,
                         int64_t* neg_infs) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  const std::vector<double> a = actual.ToVector(), e = expected.ToVector();
  for (size_t i = 0; i < e.size(); ++i) {
    if (std::isnan(e[i])) {
      EXPECT_TRUE(std::isnan(a[i])) << what << " at " << i << ": " << a[i];
      ++*nans;
    } else if (std::isinf(e[i])) {
      EXPECT_EQ(a[i], e[i]) << what << " at " << i;
      *neg_infs += e[i] < 0;
    } else {
      EXPECT_NEAR(a[i], e[i], tol.atol + tol.rtol * std::abs(e[i]))
          << what << " at " << i;
    }
  }
}

// A +inf in k or q gives a +inf score; the float64 oracle then gives the
// row lse +inf and out NaN (exp(inf - inf)), and so must we, on rows split
// over several tiles (the max +inf once read as "no allowed key": out 0,
// lse -inf). Rows the pattern leaves without keys still get out 0 and lse
// -inf, even with +inf in their q.
TEST(AttentionTest, InfInQOrKGivesTheOraclesNaNRows) {
  Generator gen = TestGenerator();
  const int64_t n = 24;
  BlockSparseOptions explicit_mask = Sparse(SparsePattern::kExplicit, 8);
  explicit_mask.explicit_mask = RandomExplicitMask(3, gen);
  std::vector<AttentionCase> cases = {
      Case("dense", n, 2, DenseSpec()),
      Case("head_groups w{8,16} r{1,2}", n, 4,
           DilatedSpec({8, 16}, {1, 2}, HeadLayout::kHeadGroups)),
      Case("explicit block mask", n, 2, BlockSparseSpec(explicit_mask))};
  for (AttentionCase& c : cases) {
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      for (bool causal : {false, true}) {
        SCOPED_TRACE(c.name + " " + DTypeName(dtype) +
                     (causal ? " causal" : ""));
        c.options.causal = causal;
        c.options.query_tile = 5;
        c.options.key_tile = 7;
        const Qkv in = InputsWithInf(c, dtype, /*u=*/5, /*t=*/2, gen);
        const AttentionResult r =
            Attention(in.q, in.k, in.v, c.pattern, c.options, c.call);
        const testing::OracleWeights w = testing::WeightsFor(c, gen);
        testing::OracleAttrs attrs;
        attrs.numbers["scale"] = 1 / std::sqrt(static_cast<double>(c.head_dim));
        const testing::OracleResult want = testing::RunTorchOp(
            "masked_attention", {in.q, in.k, in.v, w.counts, w.keep}, attrs);
        const Tolerance tol = DefaultTolerance(dtype);
        int64_t nans = 0, neg_infs = 0;
        ExpectSameNonFinite(r.out, want.outputs[0], tol, "out", &nans,
                            &neg_infs);
        EXPECT_GT(nans, 0) << "no row reached a +inf score";
        nans = 0;
        ExpectSameNonFinite(r.lse, want.outputs[1], tol, "lse", &nans,
                            &neg_infs);
        EXPECT_EQ(nans, 0) << "a +inf score gives lse +inf, not NaN";
        if (c.name != "dense") {
          EXPECT_GT(neg_infs, 0) << "no empty row";
        }
      }
    }
  }
}

}  // namespace
}  // namespace lc
