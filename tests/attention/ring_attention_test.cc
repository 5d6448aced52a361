// Ring attention (attention/ring_attention.h) on k thread ranks against
// single-rank Attention on the same tokens: out, lse and the gradients of q,
// k and v, every row of every rank, for k in {1, 2, 3, 4, 8}, both chunk
// layouts, every pattern type, causal and not, float64 and float32, on
// sequence lengths no k divides (and ones so short that ranks hold one token
// or none); with sliding windows and soft-capping too. Then the named
// regressions of the Python ring classes this project replaces: K
// overwritten by V in a shared receive buffer, one causal mask for every
// chunk pair, and dK/dV that never return to their owner.
#include "attention/ring_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/attention.h"
#include "attention/pattern.h"
#include "core/autograd.h"
#include "core/random.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/shape_ops.h"
#include "tests/attention/attention_test_util.h"
#include "tests/distributed/ring_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

constexpr int kRankCounts[] = {1, 2, 3, 4, 8};
constexpr SequenceLayout kLayouts[] = {SequenceLayout::kContiguous,
                                       SequenceLayout::kZigzag};

// One problem: shapes, pattern and options. Dropout draws from a copy of
// `dropout_state` on every rank and on the single rank alike; with
// `seeds_apart`, rank r's copy has seed dropout_state.seed() + r instead (the
// same offset), as a trainer seeds its ranks.
struct RingCase {
  std::string name;
  int64_t batch = 2, n = 37, heads = 3, head_dim = 4;
  AttentionPattern pattern;
  AttentionOptions options;
  AttentionCallOptions call;  // its generator is set from dropout_state
  Generator dropout_state{0};
  bool seeds_apart = false;
};

// The whole-sequence inputs of one comparison and the gradients fed back
// into out and lse.
struct Inputs {
  Tensor q, k, v, grad_out, grad_lse;
};

Inputs RandomInputs(const RingCase& c, DType dtype, Generator& gen) {
  const Shape shape = {c.batch, c.n, c.heads, c.head_dim};
  return {Randn(shape, gen, dtype), Randn(shape, gen, dtype),
          Randn(shape, gen, dtype), Randn(shape, gen, dtype),
          Randn({c.batch, c.heads, c.n}, gen, dtype)};
}

// out, lse and the gradients of q, k, v (undefined when no backward ran).
struct Results {
  Tensor out, lse, dq, dk, dv;
};

Results SingleRank(const RingCase& c, const Inputs& in, bool backward = true) {
  Tensors leaves = {in.q.detach(), in.k.detach(), in.v.detach()};
  for (Tensor& t : leaves) t.set_requires_grad(backward);
  Generator gen = c.dropout_state;
  AttentionCallOptions call = c.call;
  call.generator = &gen;
  AttentionResult r =
      Attention(leaves[0], leaves[1], leaves[2], c.pattern, c.options, call);
  if (backward) Backward({r.out, r.lse}, {in.grad_out, in.grad_lse});
  return {r.out.detach(), r.lse.detach(), leaves[0].grad(), leaves[1].grad(),
          leaves[2].grad()};
}

struct RingRun {
  absl::Status status;
  std::vector<Results> ranks;  // by rank
  std::vector<RingStats> stats;
  std::vector<CommStats> comm_stats;
};

// Runs RingAttention on k thread ranks, each on its SplitSequence rows of
// `in` (passed through `prepare`, e.g. to make them strided), and, when
// `backward`, backpropagates its rows of grad_out and grad_lse.
RingRun RunRing(const RingCase& c, const Inputs& in, int k,
                SequenceLayout layout, bool backward = true,
                const std::function<Tensor(const Tensor&)>& prepare = nullptr) {
  RingRun run;
  run.ranks.resize(k);
  run.stats.resize(k);
  run.comm_stats.resize(k);
  run.status = RunRanks(k, [&](Communicator& comm) {
    const int r = comm.rank();
    Tensors local;
    for (const Tensor* t : {&in.q, &in.k, &in.v}) {
      Tensor x = SplitSequence(*t, k, r, layout).detach();
      if (prepare) x = prepare(x);
      x.set_requires_grad(backward);
      local.push_back(x);
    }
    Generator gen = c.dropout_state;
    if (c.seeds_apart) {
      gen = Generator(c.dropout_state.seed() + r);
      gen.set_offset(c.dropout_state.offset());
    }
    AttentionCallOptions call = c.call;
    call.generator = &gen;
    RingOptions ring;
    ring.layout = layout;
    ring.stats = &run.stats[r];
    AttentionResult res = RingAttention(comm, local[0], local[1], local[2], c.n,
                                        c.pattern, c.options, ring, call);
    if (backward) {
      Backward({res.out, res.lse},
               {SplitSequence(in.grad_out, k, r, layout),
                testing::SplitStat(in.grad_lse, k, r, layout)});
    }
    run.ranks[r] = {res.out.detach(), res.lse.detach(), local[0].grad(),
                    local[1].grad(), local[2].grad()};
    run.comm_stats[r] = comm.stats();
    return absl::OkStatus();
  });
  return run;
}

// The tolerance for a gradient: `tol`, but for float32 with atol at least
// rtol times the tensor's largest magnitude. A gradient element is a sum
// over many queries (dK, dV) or keys (dQ) with cancellation, so an element
// much smaller than its terms carries their absolute rounding error (seen:
// 1.6e-6 on an element of 0.047 whose terms are ~1); the ring adds the terms
// in ring-step order, the single rank in tile order. float64 stays at its
// default.
testing::Tolerance GradientTolerance(testing::Tolerance tol,
                                     const Tensor& expected) {
  if (expected.dtype() == DType::kFloat64) return tol;
  double largest = 0;
  for (double x : expected.ToVector()) largest = std::max(largest, std::abs(x));
  tol.atol = std::max(tol.atol, tol.rtol * largest);
  return tol;
}

// Every rank's out, lse (and, when `want` has them, dq, dk, dv) equal its
// rows of the single-rank results within `tol`.
void ExpectRanksMatch(const RingRun& got, const Results& want, int k,
                      SequenceLayout layout, testing::Tolerance tol) {
  ASSERT_TRUE(got.status.ok()) << got.status;
  const testing::Tolerance dq_tol =
      want.dq.defined() ? GradientTolerance(tol, want.dq) : tol;
  const testing::Tolerance dk_tol =
      want.dk.defined() ? GradientTolerance(tol, want.dk) : tol;
  const testing::Tolerance dv_tol =
      want.dv.defined() ? GradientTolerance(tol, want.dv) : tol;
  for (int r = 0; r < k; ++r) {
    SCOPED_TRACE(absl::StrCat("rank ", r));
    const Results& g = got.ranks[r];
    testing::ExpectAllClose(g.out, SplitSequence(want.out, k, r, layout), tol,
                            "out");
    // Equal infinities match: -inf rows (queries with no key) must agree.
    testing::ExpectAllClose(g.lse, testing::SplitStat(want.lse, k, r, layout),
                            tol, "lse");
    if (!want.dq.defined()) continue;
    testing::ExpectAllClose(g.dq, SplitSequence(want.dq, k, r, layout), dq_tol,
                            "grad q");
    testing::ExpectAllClose(g.dk, SplitSequence(want.dk, k, r, layout), dk_tol,
                            "grad k");
    testing::ExpectAllClose(g.dv, SplitSequence(want.dv, k, r, layout), dv_tol,
                            "grad v");
  }
}

// For every k and layout: the ring on fresh inputs equals the single rank.
void ExpectRingMatchesSingleRank(const RingCase& c, DType dtype,
                                 const std::vector<int>& rank_counts =
                                     std::vector<int>(std::begin(kRankCounts),
                                                      std::end(kRankCounts))) {
  Generator gen = testing::TestGenerator(
      std::hash<std::string>()(c.name) + c.n * 131 +
      (c.options.causal ? 7 : 0) + static_cast<uint64_t>(dtype));
  for (int k : rank_counts) {
    for (SequenceLayout layout : kLayouts) {
      SCOPED_TRACE(absl::StrCat(
          c.name, c.options.causal ? " causal" : "", " n=", c.n, " k=", k, " ",
          SequenceLayoutName(layout), " ", DTypeName(dtype)));
      const Inputs in = RandomInputs(c, dtype, gen);
      const Results want = SingleRank(c, in);
      ExpectRanksMatch(RunRing(c, in, k, layout), want, k, layout,
                       testing::DefaultTolerance(dtype));
    }
  }
}

// ---- The patterns ----

DilatedOptions Dilated(std::vector<int64_t> segments,
                       std::vector<int64_t> rates, HeadLayout layout) {
  DilatedOptions options;
  options.segment_lengths = std::move(segments);
  options.dilation_rates = std::move(rates);
  options.head_layout = layout;
  return options;
}

BlockSparseOptions Sparse(SparsePattern pattern, int64_t block_size) {
  BlockSparseOptions options;
  options.pattern = pattern;
  options.block_size = block_size;
  options.window = 4;
  options.stride = 3;
  options.global_tokens = 4;
  options.density = 0.3;
  options.seed = 11;
  return options;
}

AttentionPattern WithBlockMask(AttentionPattern pattern,
                               const BlockSparseOptions& options, int64_t n) {
  auto mask = MakeBlockMask(options, n);
  LC_CHECK(mask.ok()) << mask.status();
  pattern.block_mask = std::make_shared<const BlockMask>(*std::move(mask));
  return pattern;
}

struct PatternSpec {
  const char* name;
  std::function<AttentionPattern(int64_t heads, int64_t n)> build;
};

// Every pattern type; segment lengths chosen so that at n = 37 some
// segments are shorter than a chunk, some span several, and one (w > n)
// spans the whole sequence.
const std::vector<PatternSpec>& Patterns() {
  static const auto* const patterns = new std::vector<PatternSpec>{
      {"dense", [](int64_t h, int64_t n) { return testing::DenseHeads(h, n); }},
      {"dilated_head_groups",
       [](int64_t h, int64_t) {
         return testing::DilatedHeads(
             Dilated({4, 9, 16}, {1, 2, 4}, HeadLayout::kHeadGroups), h);
       }},
      {"dilated_all_heads",
       [](int64_t h, int64_t) {
         return testing::DilatedHeads(
             Dilated({5, 12, 40}, {2, 3, 2}, HeadLayout::kAllHeads), h);
       }},
      {"local_window",
       [](int64_t h, int64_t n) {
         return testing::BlockSparseHeads(
             Sparse(SparsePattern::kLocalWindow, 4), h, n);
       }},
      {"dilated_sparse",
       [](int64_t h, int64_t n) {
         return testing::BlockSparseHeads(
             Sparse(SparsePattern::kDilatedSparse, 4), h, n);
       }},
      {"global_local",
       [](int64_t h, int64_t n) {
         return testing::BlockSparseHeads(
             Sparse(SparsePattern::kGlobalLocal, 4), h, n);
       }},
      {"random",
       [](int64_t h, int64_t n) {
         return testing::BlockSparseHeads(Sparse(SparsePattern::kRandom, 3), h,
                                          n);
       }},
      {"dilated_and_block_mask",
       [](int64_t h, int64_t n) {
         return WithBlockMask(
             testing::DilatedHeads(
                 Dilated({8, 24}, {1, 2}, HeadLayout::kAllHeads), h),
             Sparse(SparsePattern::kLocalWindow, 3), n);
       }},
  };
  return *patterns;
}

RingCase MakeCase(const PatternSpec& spec, int64_t n, bool causal,
                  int64_t heads = 3) {
  RingCase c;
  c.name = spec.name;
  c.n = n;
  c.heads = heads;
  c.pattern = spec.build(heads, n);
  c.options.causal = causal;
  // Small tiles, so tiles end inside chunks and chunks inside tiles.
  c.options.query_tile = 3;
  c.options.key_tile = 5;
  return c;
}

// ---- Equivalence ----

struct EquivalenceParam {
  int pattern;
  DType dtype;
};

class RingEquivalenceTest : public ::testing::TestWithParam<EquivalenceParam> {
};

// The full matrix: k in {1, 2, 3, 4, 8}, both layouts, causal and not, at
// n = 37 (divisible by no k > 1; zigzag with k = 8 cuts 16 chunks of 2 or 3).
TEST_P(RingEquivalenceTest, MatchesSingleRank) {
  const PatternSpec& spec = Patterns()[GetParam().pattern];
  for (bool causal : {false, true}) {
    ExpectRingMatchesSingleRank(MakeCase(spec, 37, causal), GetParam().dtype);
  }
}

std::vector<EquivalenceParam> AllEquivalenceParams() {
  std::vector<EquivalenceParam> params;
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    for (int i = 0; i < static_cast<int>(Patterns().size()); ++i) {
      params.push_back({i, dtype});
    }
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(
    RingPatterns, RingEquivalenceTest,
    ::testing::ValuesIn(AllEquivalenceParams()),
    [](const ::testing::TestParamInfo<EquivalenceParam>& info) {
      return absl::StrCat(Patterns()[info.param.pattern].name, "_",
                          DTypeName(info.param.dtype));
    });

// Sequences shorter than the number of chunks: with n = 5 and k = 8 the last
// ranks hold no token (both layouts); with n = 11 and k = 8 zigzag every rank
// holds one or two. Ranks with no token still relay K/V and take part in
// backward; their outputs and gradients are empty tensors.
TEST(RingAttentionTest, RanksWithOneTokenOrNone) {
  for (int64_t n : {5, 11}) {
    for (const char* name : {"dense", "dilated_all_heads", "local_window"}) {
      for (const PatternSpec& spec : Patterns()) {
        if (std::string(spec.name) != name) continue;
        for (bool causal : {false, true}) {
          ExpectRingMatchesSingleRank(MakeCase(spec, n, causal),
                                      DType::kFloat64, {3, 4, 8});
        }
      }
    }
  }
  // Empty ranks really happen in these cases.
  EXPECT_EQ(RankTokenCount(5, 8, 7, SequenceLayout::kContiguous), 0);
  EXPECT_EQ(RankTokenCount(5, 8, 6, SequenceLayout::kZigzag), 0);
  EXPECT_EQ(RankTokenCount(11, 8, 0, SequenceLayout::kZigzag), 1);
}

// Dilated patterns whose segments are shorter than a chunk, equal to it,
// span several chunks (unaligned with the chunk boundaries), equal the
// sequence, and exceed it; each alone (all heads, r = 2 and 3, so heads get
// different offsets) and all together. n = 48: chunks of 24, 16, 12, 6
// tokens (contiguous, k = 2, 3, 4, 8) and half that (zigzag).
TEST(RingAttentionTest, DilatedSegmentsAgainstChunkSizes) {
  const int64_t n = 48;
  for (int k : {2, 3, 4, 8}) {
    for (SequenceLayout layout : kLayouts) {
      const int64_t chunk = n / (layout == SequenceLayout::kZigzag ? 2 * k : k);
      const std::vector<int64_t> segments = {std::max<int64_t>(chunk / 2, 1),
                                             chunk, 2 * chunk + 1, n, n + 7};
      std::vector<std::pair<std::string, DilatedOptions>> variants;
      for (int64_t w : segments) {
        variants.push_back({absl::StrCat("w=", w, " r=2,3"),
                            Dilated({w, w}, {2, 3}, HeadLayout::kAllHeads)});
      }
      variants.push_back(
          {"all segments, head groups",
           Dilated(segments, {1, 2, 1, 3, 2}, HeadLayout::kHeadGroups)});
      Generator gen =
          testing::TestGenerator(k * 2 + (layout == SequenceLayout::kZigzag));
      for (const auto& [label, dilated] : variants) {
        for (bool causal : {false, true}) {
          RingCase c;
          c.n = n;
          c.heads = 5;
          c.name = absl::StrCat(label, " chunk=", chunk);
          c.pattern = testing::DilatedHeads(dilated, c.heads);
          c.options.causal = causal;
          c.options.query_tile = 4;
          c.options.key_tile = 7;
          SCOPED_TRACE(absl::StrCat(c.name, causal ? " causal" : "", " k=", k,
                                    " ", SequenceLayoutName(layout)));
          const Inputs in = RandomInputs(c, DType::kFloat64, gen);
          ExpectRanksMatch(RunRing(c, in, k, layout), SingleRank(c, in), k,
                           layout, testing::DefaultTolerance(DType::kFloat64));
        }
      }
    }
  }
}

// A key padding mask (one batch row with random padding, one padded but for
// its last key, so most causal queries have no key) and attention dropout
// (every rank and the single rank draw from copies of one generator state),
// through the ring.
TEST(RingAttentionTest, KeyPaddingMaskAndDropout) {
  Generator mask_gen = testing::TestGenerator(1);
  const int64_t n = 37;
  std::vector<double> padding(2 * n, 1.0);
  const Tensor coin = Rand({n}, mask_gen, DType::kFloat64);
  for (int64_t u = 0; u < n; ++u) padding[u] = coin.ToVector()[u] < 0.3;
  padding[2 * n - 1] = 0;
  const Tensor mask = FromVector(padding, {2, n}, DType::kUInt8);
  for (const char* name : {"dense", "dilated_head_groups", "global_local"}) {
    for (const PatternSpec& spec : Patterns()) {
      if (std::string(spec.name) != name) continue;
      for (bool causal : {false, true}) {
        for (double dropout : {0.0, 0.25}) {
          RingCase c = MakeCase(spec, n, causal);
          c.name = absl::StrCat(name, " padding, dropout ", dropout);
          c.call.key_padding_mask = mask;
          c.options.dropout = dropout;
          c.dropout_state = Generator(0xd15ea5e);
          c.dropout_state.set_offset(3);
          ExpectRingMatchesSingleRank(c, DType::kFloat64);
        }
      }
    }
  }
  // float32, a slice.
  RingCase c = MakeCase(Patterns()[0], n, true);
  c.call.key_padding_mask = mask;
  c.options.dropout = 0.25;
  c.dropout_state = Generator(99);
  ExpectRingMatchesSingleRank(c, DType::kFloat32, {3, 8});
}

// Sliding windows (both sides, one side unlimited, 0 wide, narrower and
// wider than a chunk) and soft-capping, each alone and together, on dense,
// dilated and block-sparse patterns, causal and not, for k = 2 and 3 on
// n = 37 (no k divides it), both layouts: positions stay global, so every
// rank keeps exactly the pairs one rank keeps.
TEST(RingAttentionTest, WindowsAndSoftcap) {
  struct Variant {
    int64_t left, right;
    double softcap;
  };
  const Variant variants[] = {{4, 2, 0},  {0, 0, 0},     {-1, 6, 0},
                              {9, -1, 0}, {-1, -1, 0.8}, {5, 1, 0.8}};
  for (const char* name : {"dense", "dilated_head_groups", "local_window",
                           "dilated_and_block_mask"}) {
    for (const PatternSpec& spec : Patterns()) {
      if (std::string(spec.name) != name) continue;
      for (bool causal : {false, true}) {
        for (const Variant& v : variants) {
          RingCase c = MakeCase(spec, 37, causal);
          c.name = absl::StrCat(name, " window (", v.left, ", ", v.right,
                                ") softcap ", v.softcap);
          c.options.window_left = v.left;
          c.options.window_right = v.right;
          c.options.softcap = v.softcap;
          ExpectRingMatchesSingleRank(c, DType::kFloat64, {2, 3});
        }
      }
    }
  }
  // float32, a slice.
  RingCase c = MakeCase(Patterns()[1], 37, true);
  c.name = "dilated window (7, 0) softcap 0.8";
  c.options.window_left = 7;
  c.options.window_right = 0;
  c.options.softcap = 0.8;
  ExpectRingMatchesSingleRank(c, DType::kFloat32, {2, 3});
}

// Ranks whose generators are seeded apart (a trainer seeds each rank's
// thread for the dropout of its own tokens) drop exactly the pairs that one
// rank with rank 0's generator drops: the ring draws rank 0's stream. (Its
// agreement check refused the call, "dropout seed", so training with
// attention dropout failed on more than one rank.)
TEST(RingAttentionTest, DropoutDrawsRankZerosStream) {
  RingCase c = MakeCase(Patterns()[1], 37, true);
  c.name = "dilated, dropout, seeds apart";
  c.options.dropout = 0.25;
  c.dropout_state = Generator(7);
  c.dropout_state.set_offset(5);
  c.seeds_apart = true;
  ExpectRingMatchesSingleRank(c, DType::kFloat64, {2, 3});
}

// Strided inputs (views, not contiguous buffers) and bfloat16 (computed in
// float32) give the single-rank results too.
TEST(RingAttentionTest, StridedAndBFloat16Inputs) {
  const RingCase c = MakeCase(Patterns()[1], 37, true);
  Generator gen = testing::TestGenerator();
  for (SequenceLayout layout : kLayouts) {
    const Inputs in = RandomInputs(c, DType::kFloat64, gen);
    ExpectRanksMatch(
        RunRing(c, in, 3, layout, true,
                [](const Tensor& t) { return testing::NonContiguousCopy(t); }),
        SingleRank(c, in), 3, layout,
        testing::DefaultTolerance(DType::kFloat64));
  }
  Inputs in = RandomInputs(c, DType::kFloat32, gen);
  for (Tensor* t : {&in.q, &in.k, &in.v, &in.grad_out}) {
    *t = t->to(DType::kBFloat16);
  }
  const Results want = SingleRank(c, in);
  // Both sides round out to bfloat16 once; the lse and gradients are float32
  // from differently ordered sums.
  ExpectRanksMatch(RunRing(c, in, 4, SequenceLayout::kZigzag), want, 4,
                   SequenceLayout::kZigzag,
                   testing::DefaultTolerance(DType::kBFloat16));
}

// The same inputs on the same number of ranks give bit-identical results.
TEST(RingAttentionTest, Deterministic) {
  const RingCase c = MakeCase(Patterns()[2], 37, true);
  Generator gen = testing::TestGenerator();
  const Inputs in = RandomInputs(c, DType::kFloat32, gen);
  const RingRun first = RunRing(c, in, 4, SequenceLayout::kZigzag);
  const RingRun second = RunRing(c, in, 4, SequenceLayout::kZigzag);
  ASSERT_TRUE(first.status.ok()) << first.status;
  ASSERT_TRUE(second.status.ok()) << second.status;
  for (int r = 0; r < 4; ++r) {
    const Results& a = first.ranks[r];
    const Results& b = second.ranks[r];
    EXPECT_TRUE(testing::BitwiseEqual(a.out, b.out)) << "rank " << r;
    EXPECT_TRUE(testing::BitwiseEqual(a.lse, b.lse)) << "rank " << r;
    EXPECT_TRUE(testing::BitwiseEqual(a.dq, b.dq)) << "rank " << r;
    EXPECT_TRUE(testing::BitwiseEqual(a.dk, b.dk)) << "rank " << r;
    EXPECT_TRUE(testing::BitwiseEqual(a.dv, b.dv)) << "rank " << r;
  }
}

// ---- Named regressions of the Python ring classes ----

// The Python ring received K and V into one shared buffer, so V overwrote K
// and every step attended with scores q.v. Here K and V are far apart (v is
// k reflected and shifted by a large per-position ramp; a constant shift
// alone would cancel in the softmax) so that attending with V as keys gives
// a very different out, which this test first shows on the single rank; the
// ring must give the single-rank result, and leave the caller's k and v
// untouched.
TEST(RingRegressionTest, KeyNotOverwrittenByValue) {
  RingCase c = MakeCase(Patterns()[0], 37, false);
  Generator gen = testing::TestGenerator();
  Inputs in = RandomInputs(c, DType::kFloat64, gen);
  const Tensor ramp =
      Arange(0, c.n, 1, DType::kFloat64).view({1, c.n, 1, 1}) * 25.0;
  in.v = (in.k * -1.0 + ramp).contiguous();
  // The failure mode is visible: keys replaced by values change out by far.
  Inputs swapped = in;
  swapped.k = in.v;
  const Results want = SingleRank(c, in);
  const std::vector<double> a = want.out.ToVector();
  const std::vector<double> b = SingleRank(c, swapped, false).out.ToVector();
  double max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(a[i] - b[i]));
  }
  ASSERT_GT(max_diff, 1.0) << "the test inputs cannot tell K from V";

  for (int k : {2, 3, 4, 8}) {
    for (SequenceLayout layout : kLayouts) {
      SCOPED_TRACE(absl::StrCat("k=", k, " ", SequenceLayoutName(layout)));
      // The inputs each rank passes, kept to check they are not written.
      std::vector<Tensors> passed(k);
      RingRun run;
      run.ranks.resize(k);
      run.status = RunRanks(k, [&](Communicator& comm) {
        const int r = comm.rank();
        Tensors local;
        for (const Tensor* t : {&in.q, &in.k, &in.v}) {
          Tensor x = SplitSequence(*t, k, r, layout).detach();
          x.set_requires_grad(true);
          local.push_back(x);
          passed[r].push_back(x.clone());
        }
        RingOptions ring;
        ring.layout = layout;
        AttentionResult res = RingAttention(comm, local[0], local[1], local[2],
                                            c.n, c.pattern, c.options, ring);
        Backward({res.out, res.lse},
                 {SplitSequence(in.grad_out, k, r, layout),
                  testing::SplitStat(in.grad_lse, k, r, layout)});
        run.ranks[r] = {res.out, res.lse, local[0].grad(), local[1].grad(),
                        local[2].grad()};
        for (int i = 0; i < 3; ++i) {
          EXPECT_TRUE(testing::BitwiseEqual(local[i], passed[r][i]))
              << "rank " << r << " input " << i << " was written";
        }
        return absl::OkStatus();
      });
      ExpectRanksMatch(run, want, k, layout,
                       testing::DefaultTolerance(DType::kFloat64));
    }
  }
}

// The Python ring applied one causal mask (the diagonal chunk's) to every
// chunk pair. Each pair needs its own: with k = 4, ring results equal the
// single rank's, and out[t] and lse[t] do not change when the keys and
// values at positions > t change, for every t (so no later key leaks in
// through a pair that should have been masked or skipped).
TEST(RingRegressionTest, CausalMaskPerChunkPair) {
  const int k = 4;
  for (const PatternSpec& spec : {Patterns()[0], Patterns()[2]}) {
    const RingCase c = MakeCase(spec, 37, true);
    Generator gen = testing::TestGenerator();
    for (SequenceLayout layout : kLayouts) {
      SCOPED_TRACE(absl::StrCat(c.name, " ", SequenceLayoutName(layout)));
      const Inputs in = RandomInputs(c, DType::kFloat64, gen);
      const RingRun base = RunRing(c, in, k, layout);
      ExpectRanksMatch(base, SingleRank(c, in), k, layout,
                       testing::DefaultTolerance(DType::kFloat64));
      ASSERT_TRUE(base.status.ok());
      std::vector<Tensor> outs, lses;
      for (const Results& r : base.ranks) {
        outs.push_back(r.out);
        lses.push_back(r.lse.transpose(1, 2));
      }
      const Tensor base_out = testing::GatherRows(outs, c.n, layout);
      const Tensor base_lse = testing::GatherRows(lses, c.n, layout);
      const Inputs noise = RandomInputs(c, DType::kFloat64, gen);
      for (int64_t t = 0; t < c.n; ++t) {
        SCOPED_TRACE(absl::StrCat("keys after t = ", t, " changed"));
        // k and v of positions > t replaced by fresh values.
        Inputs changed = in;
        changed.k = Concat(
            {in.k.slice(1, 0, t + 1), noise.k.slice(1, t + 1, c.n) * 10.0}, 1);
        changed.v = Concat(
            {in.v.slice(1, 0, t + 1), noise.v.slice(1, t + 1, c.n) * 10.0}, 1);
        const RingRun run = RunRing(c, changed, k, layout, false);
        ASSERT_TRUE(run.status.ok()) << run.status;
        outs.clear();
        lses.clear();
        for (const Results& r : run.ranks) {
          outs.push_back(r.out);
          lses.push_back(r.lse.transpose(1, 2));
        }
        // Bit for bit: the changed keys must not enter these rows at all.
        EXPECT_TRUE(testing::BitwiseEqual(
            testing::GatherRows(outs, c.n, layout).slice(1, 0, t + 1),
            base_out.slice(1, 0, t + 1)))
            << "out up to t changed";
        EXPECT_TRUE(testing::BitwiseEqual(
            testing::GatherRows(lses, c.n, layout).slice(1, 0, t + 1),
            base_lse.slice(1, 0, t + 1)))
            << "lse up to t changed";
      }
    }
  }
}

// The Python ring never sent dK/dV back to the rank owning the K/V chunk.
// Block masks made so that some ranks' chunks are attended only by other
// ranks' queries (a shifted block diagonal without the diagonal), or by no
// query at all (only key block 0 is attended): every row of dK and dV on
// every rank equals the single-rank gradient, zeros included.
TEST(RingRegressionTest, GradientsReturnToOwner) {
  const int64_t n = 40, heads = 2;
  const int64_t block = 5;  // 8 blocks: one per zigzag chunk with k = 4
  const int64_t blocks = n / block;
  auto mask_pattern = [&](const std::function<bool(int64_t, int64_t)>& on) {
    auto mask = std::make_shared<BlockMask>(BlockMask::FromPairs(
        block, blocks, [&](int64_t qb, int64_t kb) { return on(qb, kb); }));
    AttentionPattern pattern = testing::DenseHeads(heads, n);
    pattern.block_mask = mask;
    return pattern;
  };
  struct Variant {
    const char* name;
    AttentionPattern pattern;
    bool causal;
  };
  const std::vector<Variant> variants = {
      // Query block b attends key blocks b + 3 and b + 4 (mod 8) only: with
      // k = 4 contiguous, rank r's chunk is needed by ranks r - 2 and
      // r - 1 and never by r.
      {"shifted", mask_pattern([&](int64_t qb, int64_t kb) {
         return kb == (qb + 3) % blocks || kb == (qb + 4) % blocks;
       }),
       false},
      // Everyone attends key block 0 only: one chunk needed by all ranks,
      // the others by none (their dK, dV are zero and must arrive as such).
      {"first block only",
       mask_pattern([](int64_t, int64_t kb) { return kb == 0; }), false},
      {"first block only, causal",
       mask_pattern([](int64_t, int64_t kb) { return kb == 0; }), true},
      // Queries of the second half attend keys of the first half only.
      {"second half to first half", mask_pattern([&](int64_t qb, int64_t kb) {
         return qb >= blocks / 2 && kb < blocks / 2;
       }),
       true},
  };
  Generator gen = testing::TestGenerator();
  for (const Variant& variant : variants) {
    RingCase c;
    c.name = variant.name;
    c.n = n;
    c.heads = heads;
    c.pattern = variant.pattern;
    c.options.causal = variant.causal;
    for (int k : {2, 3, 4, 8}) {
      for (SequenceLayout layout : kLayouts) {
        SCOPED_TRACE(
            absl::StrCat(c.name, " k=", k, " ", SequenceLayoutName(layout)));
        const Inputs in = RandomInputs(c, DType::kFloat64, gen);
        const Results want = SingleRank(c, in);
        const RingRun run = RunRing(c, in, k, layout);
        ExpectRanksMatch(run, want, k, layout,
                         testing::DefaultTolerance(DType::kFloat64));
      }
    }
  }
}

}  // namespace
}  // namespace lc
