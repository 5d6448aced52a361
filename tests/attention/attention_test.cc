// lc::Attention against the torch oracle and ReferenceAttention for every
// pattern type (dense, dilated head groups and all heads, block-sparse, their
// intersection), causal and not, with small and default tiles; float32 and
// bfloat16 against float64; finite differences; key padding; dropout; tile
// order.
#include "attention/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attention/reference_attention.h"
#include "attention/tile_plan.h"
#include "core/autograd.h"
#include "core/random.h"
#include "gtest/gtest.h"
#include "tests/attention/attention_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::AttentionCase;
using testing::BitwiseEqual;
using testing::BlockSparseHeads;
using testing::DefaultTolerance;
using testing::DenseHeads;
using testing::DilatedHeads;
using testing::DropoutGeneratorState;
using testing::ExpectAllClose;
using testing::ExpectAttentionMatchesOracle;
using testing::ExpectGradientsMatchFiniteDifferences;
using testing::ExpectLseClose;
using testing::OpFn;
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
                   AttentionPattern pattern) {
  AttentionCase c;
  c.name = std::move(name);
  c.n = n;
  c.heads = heads;
  c.pattern = std::move(pattern);
  return c;
}

DilatedOptions Dilated(std::vector<int64_t> w, std::vector<int64_t> r,
                       HeadLayout layout) {
  DilatedOptions o;
  o.segment_lengths = std::move(w);
  o.dilation_rates = std::move(r);
  o.head_layout = layout;
  return o;
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
  cases.push_back(Case("dense", 37, 3, DenseHeads(3, 37)));
  // Head groups: n divisible by every segment length.
  cases.push_back(
      Case("head_groups w{8,16} r{1,2} n48", 48, 4,
           DilatedHeads(Dilated({8, 16}, {1, 2}, HeadLayout::kHeadGroups), 4)));
  // Head groups: last segments short (53 = 5*10+3 = 2*24+5), r up to 3.
  cases.push_back(Case(
      "head_groups w{10,24} r{2,3} n53", 53, 4,
      DilatedHeads(Dilated({10, 24}, {2, 3}, HeadLayout::kHeadGroups), 4)));
  // 5 heads in 3 groups (sizes 2, 2, 1), offsets g mod r = 0, 1, 2.
  cases.push_back(
      Case("head_groups 5 heads 3 groups n41", 41, 5,
           DilatedHeads(
               Dilated({6, 12, 20}, {1, 2, 4}, HeadLayout::kHeadGroups), 5)));
  // Fewer heads than groups: the last group is empty.
  cases.push_back(
      Case("head_groups 2 heads 3 groups n45", 45, 2,
           DilatedHeads(
               Dilated({8, 16, 32}, {1, 2, 4}, HeadLayout::kHeadGroups), 2)));
  cases.push_back(
      Case("all_heads w{8,16} r{1,2} n40", 40, 3,
           DilatedHeads(Dilated({8, 16}, {1, 2}, HeadLayout::kAllHeads), 3)));
  // All heads, offsets j mod r over 5 heads, last segments short.
  cases.push_back(Case(
      "all_heads w{7,15,31} r{1,3,5} n45", 45, 5,
      DilatedHeads(Dilated({7, 15, 31}, {1, 3, 5}, HeadLayout::kAllHeads), 5)));
  // Block-sparse, block size 8 over n = 45 (6 blocks, the last of 5).
  const int64_t n = 45;
  BlockSparseOptions local = Sparse(SparsePattern::kLocalWindow, 8);
  local.window = 8;
  cases.push_back(Case("local_window", n, 2, BlockSparseHeads(local, 2, n)));
  BlockSparseOptions dilated = Sparse(SparsePattern::kDilatedSparse, 8);
  dilated.stride = 2;
  cases.push_back(
      Case("dilated_sparse", n, 2, BlockSparseHeads(dilated, 2, n)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 8);
  global.global_tokens = 8;
  global.window = 0;
  cases.push_back(Case("global_local", n, 2, BlockSparseHeads(global, 2, n)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 8);
  random.seed = 7;
  random.density = 0.3;
  cases.push_back(Case("random", n, 2, BlockSparseHeads(random, 2, n)));
  BlockSparseOptions explicit_mask = Sparse(SparsePattern::kExplicit, 8);
  explicit_mask.explicit_mask = RandomExplicitMask(6, gen);
  cases.push_back(
      Case("explicit", n, 2, BlockSparseHeads(explicit_mask, 2, n)));
  // A dilated pattern intersected with a block mask (block 6, n = 50).
  AttentionPattern both =
      DilatedHeads(Dilated({16, 32}, {1, 2}, HeadLayout::kAllHeads), 2);
  BlockSparseOptions window6 = Sparse(SparsePattern::kLocalWindow, 6);
  window6.window = 6;
  both.block_mask = BlockSparseHeads(window6, 2, 50).block_mask;
  cases.push_back(Case("dilated x local_window", 50, 2, both));
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
          Attention(in.q, in.k, in.v, c.pattern, c.options);
      ASSERT_EQ(got.out.dtype(), DType::kFloat32);
      ASSERT_EQ(got.lse.dtype(), DType::kFloat32);
      const AttentionResult want =
          ReferenceAttention(in.q, in.k, in.v, c.pattern, c.options);
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
  AttentionCase c =
      Case("all_heads bf16", 40, 3,
           DilatedHeads(Dilated({8, 16}, {1, 2}, HeadLayout::kAllHeads), 3));
  c.options.causal = true;
  c.options.query_tile = 5;
  c.options.key_tile = 7;
  const Qkv in = RandomQkv(c, DType::kBFloat16, gen);
  const AttentionResult r = Attention(in.q, in.k, in.v, c.pattern, c.options);
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
  AttentionPattern pattern =
      DilatedHeads(Dilated({4, 8}, {1, 2}, HeadLayout::kAllHeads), heads);
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
  cases.push_back(Case("dense", 33, 2, DenseHeads(2, 33)));
  cases.push_back(
      Case("all_heads", 41, 3,
           DilatedHeads(Dilated({8, 16}, {1, 2}, HeadLayout::kAllHeads), 3)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 6);
  global.global_tokens = 4;
  global.window = 6;
  cases.push_back(Case("global_local", 39, 2, BlockSparseHeads(global, 2, 39)));
  for (AttentionCase c : cases) {
    c.batch = 3;
    c.options.key_padding_mask = PaddingMask(c.batch, c.n, gen);
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
  AttentionCase c =
      Case("all_heads", 24, 2,
           DilatedHeads(Dilated({8, 12}, {1, 2}, HeadLayout::kAllHeads), 2));
  c.options.key_padding_mask = PaddingMask(c.batch, c.n, gen);  // batch 1
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    SCOPED_TRACE(DTypeName(dtype));
    Qkv in = RandomQkv(c, dtype, gen);
    for (Tensor* t : {&in.q, &in.k, &in.v}) t->set_requires_grad(true);
    const AttentionResult r = Attention(in.q, in.k, in.v, c.pattern, c.options);
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
  cases.push_back(
      Case("all_heads", 40, 3,
           DilatedHeads(Dilated({8, 16}, {1, 2}, HeadLayout::kAllHeads), 3)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 8);
  random.density = 0.4;
  random.seed = 3;
  cases.push_back(Case("random", 43, 2, BlockSparseHeads(random, 2, 43)));
  for (AttentionCase c : cases) {
    Generator dropout_gen(gen.NextOffset() * 7919 + 11);
    dropout_gen.set_offset(5);
    c.options.dropout = 0.3;
    c.options.generator = &dropout_gen;
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

// With no generator in the options, dropout draws from DefaultGenerator().
TEST(AttentionTest, DropoutUsesDefaultGeneratorWhenNoneGiven) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("dense", 30, 2, DenseHeads(2, 30));
  c.options.dropout = 0.25;
  const Generator saved = DefaultGenerator();
  DefaultGenerator() = Generator(gen.NextOffset() + 1234);
  const uint64_t offset = DefaultGenerator().offset();
  ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
  EXPECT_EQ(DefaultGenerator().offset(), offset + 1);
  DefaultGenerator() = saved;  // later tests on this thread see no change
}

// The same generator state gives bit-identical out, lse and gradients; a
// different offset gives a different result (so the comparison can fail).
TEST(AttentionTest, DropoutIsDeterministicForAGeneratorState) {
  Generator gen = TestGenerator();
  AttentionCase c = Case(
      "all_heads", 45, 3,
      DilatedHeads(Dilated({8, 16, 32}, {1, 2, 4}, HeadLayout::kAllHeads), 3));
  c.options.dropout = 0.3;
  c.options.causal = true;
  const Qkv in = RandomQkv(c, DType::kFloat32, gen);
  const Tensor grad_out = Randn(in.q.shape(), gen);
  auto run = [&](uint64_t offset) {
    Generator dropout_gen(99);
    dropout_gen.set_offset(offset);
    AttentionOptions options = c.options;
    options.generator = &dropout_gen;
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
  const Tensors first = run(3), second = run(3), other = run(4);
  const char* names[] = {"out", "lse", "dq", "dk", "dv"};
  for (int i = 0; i < 5; ++i) {
    EXPECT_TRUE(BitwiseEqual(first[i], second[i])) << names[i];
  }
  EXPECT_FALSE(BitwiseEqual(first[0], other[0]))
      << "another offset must draw another dropout mask";
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
  cases.push_back(Case("local_window", n, 2, BlockSparseHeads(local, 2, n)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 4);
  global.global_tokens = 5;
  global.window = 4;
  cases.push_back(Case("global_local", n, 2, BlockSparseHeads(global, 2, n)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 4);
  random.density = 0.5;
  random.seed = 11;
  cases.push_back(Case("random", n, 2, BlockSparseHeads(random, 2, n)));
  cases.push_back(
      Case("all_heads", n, 3,
           DilatedHeads(Dilated({16, 32, 64}, {1, 2, 4}, HeadLayout::kAllHeads),
                        3)));
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
  AttentionCase c =
      Case("head_groups", 29, 3,
           DilatedHeads(Dilated({8, 16}, {1, 2}, HeadLayout::kHeadGroups), 3));
  c.options.causal = true;
  Qkv in = RandomQkv(c, DType::kFloat64, gen);
  in.q = testing::NonContiguousCopy(in.q);
  in.k = testing::NonContiguousCopy(in.k);
  in.v = testing::NonContiguousCopy(in.v);
  ExpectAttentionMatchesOracle(c, in);
}

// An explicit scale replaces 1 / sqrt(head_dim).
TEST(AttentionTest, ExplicitScaleMatchesTorch) {
  Generator gen = TestGenerator();
  AttentionCase c = Case("dense", 21, 2, DenseHeads(2, 21));
  c.options.scale = 0.71;
  ExpectAttentionMatchesOracle(c, RandomQkv(c, DType::kFloat64, gen));
}

}  // namespace
}  // namespace lc
