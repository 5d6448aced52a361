// What ring attention sends, per rank, forward and forward + backward:
// RingStats (bytes_sent, transfers, steps_computed, steps_skipped) and, as an
// independent count, the communicator's own CommStats, against the
// expectation of the algorithm of attention/ring_attention.cc computed here
// from first principles: hand-derived formulas for dense attention and the
// training config, and for every other pattern a model built directly from
// the definitions of SPEC section 2 (pattern, block mask, causality), pair
// by pair, not from the code under test.
//
// The algorithm (k ranks): rank h "uses" a key u of rank o's chunk when some
// query t of h attends it; the chunk's final step is the largest
// s = (h - o) mod k of a rank h that uses some key of it, and last_step the
// largest final step. At step s = 0..last_step rank r holds the chunk of
// origin (r - s) mod k while s <= final step, and computes on it when it
// uses a key of it (else the step counts as skipped). While s < final step
// it sends the chunk on to r + 1 (K and V: 2 transfers) cut down to the keys
// that the holders at steps s + 1 .. final use - per head and per pattern of
// the head, so a key two patterns use counts twice - or whole when that is
// no more data (rows * heads rows of head_dim elements). Backward sends K
// and V again, and dK/dV accumulators (2 transfers each time) in the same
// layout: they exist from the first holder (step >= 1) that uses the chunk,
// go on to the next holder while the layout stays the same, and go home to
// the owner (from the holder) when it changes or the trip ends. The owner's
// own gradients never travel. One "row" of a transfer is batch * head_dim
// float32 values.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/attention.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/random.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "tests/attention/attention_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

constexpr int64_t kBatch = 2, kHeads = 2, kHeadDim = 4;
// Bytes of one row of a transfer: float32 [batch, head_dim].
constexpr int64_t kRowBytes = kBatch * kHeadDim * 4;

struct RankCounts {
  RingStats forward;       // after the forward call
  RingStats total;         // after forward and backward
  CommStats comm_forward;  // the communicator's, ring traffic only
  CommStats comm;
};

CommStats Minus(CommStats a, const CommStats& b) {
  a.bytes_sent -= b.bytes_sent;
  a.messages_sent -= b.messages_sent;
  return a;
}

// Runs forward, then backward, on k ranks; returns each rank's counters.
// The communicator also counts the all-gather with which every call starts
// (the ranks compare their calls); it is measured on a call first that
// sends nothing (a local dilated pattern, no gradient) and subtracted.
std::vector<RankCounts> Measure(int64_t n, int k, SequenceLayout layout,
                                const AttentionPattern& pattern, bool causal,
                                int64_t batch = kBatch) {
  Generator gen = testing::TestGenerator(n * 16 + k);
  const auto heads = static_cast<int64_t>(pattern.head_patterns.size());
  const Shape shape = {batch, n, heads, kHeadDim};
  const Tensor q = Randn(shape, gen), kk = Randn(shape, gen),
               v = Randn(shape, gen), grad_out = Randn(shape, gen);
  DilatedOptions one_token;
  one_token.segment_lengths = {1};
  one_token.dilation_rates = {1};
  const AttentionPattern local = testing::DilatedHeads(one_token, heads);
  std::vector<RankCounts> counts(k);
  const absl::Status status = RunRanks(k, [&](Communicator& comm) {
    const int r = comm.rank();
    Tensors x;
    for (const Tensor* t : {&q, &kk, &v}) {
      x.push_back(SplitSequence(*t, k, r, layout).detach());
    }
    AttentionOptions options;
    options.causal = causal;
    RingStats stats;
    RingOptions ring;
    ring.layout = layout;
    ring.stats = &stats;
    RingAttention(comm, x[0], x[1], x[2], n, local, options, ring);
    EXPECT_EQ(stats.bytes_sent, 0);
    EXPECT_EQ(stats.transfers, 0);
    const CommStats all_gather = comm.stats();
    comm.ResetStats();
    stats = RingStats();
    for (Tensor& t : x) t.set_requires_grad(true);
    AttentionResult res =
        RingAttention(comm, x[0], x[1], x[2], n, pattern, options, ring);
    counts[r].forward = stats;
    counts[r].comm_forward = Minus(comm.stats(), all_gather);
    res.out.backward(SplitSequence(grad_out, k, r, layout));
    counts[r].total = stats;
    counts[r].comm = Minus(comm.stats(), all_gather);
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
  return counts;
}

int64_t Rows(int64_t n, int k, int rank, SequenceLayout layout) {
  return RankTokenCount(n, k, rank, layout);
}

// The expected counters of one rank, per pass: transfers and their rows.
struct Expected {
  int64_t forward_rows = 0, forward_transfers = 0;
  int64_t backward_rows = 0, backward_transfers = 0;
  int64_t computed = 0, skipped = 0;

  // Adds a K/V transfer of `rows` rows to both passes, a dK/dV one (on or
  // home) to backward.
  void KeyValue(int64_t rows) {
    forward_rows += 2 * rows;
    forward_transfers += 2;
    backward_rows += 2 * rows;
    backward_transfers += 2;
  }
  void Grads(int64_t rows) {
    backward_rows += 2 * rows;
    backward_transfers += 2;
  }
};

void ExpectCounts(const std::vector<RankCounts>& got,
                  const std::vector<Expected>& want,
                  int64_t row_bytes = kRowBytes) {
  const int k = static_cast<int>(want.size());
  ASSERT_EQ(static_cast<int>(got.size()), k);
  for (int r = 0; r < k; ++r) {
    SCOPED_TRACE(absl::StrCat("rank ", r, " of ", k));
    const Expected& w = want[r];
    EXPECT_EQ(got[r].forward.bytes_sent, w.forward_rows * row_bytes);
    EXPECT_EQ(got[r].forward.transfers, w.forward_transfers);
    EXPECT_EQ(got[r].forward.steps_computed, w.computed);
    EXPECT_EQ(got[r].forward.steps_skipped, w.skipped);
    EXPECT_EQ(got[r].total.bytes_sent,
              (w.forward_rows + w.backward_rows) * row_bytes);
    EXPECT_EQ(got[r].total.transfers,
              w.forward_transfers + w.backward_transfers);
    EXPECT_EQ(got[r].total.steps_computed, 2 * w.computed);
    EXPECT_EQ(got[r].total.steps_skipped, 2 * w.skipped);
    // The communicator saw the same.
    EXPECT_EQ(got[r].comm_forward.bytes_sent, got[r].forward.bytes_sent);
    EXPECT_EQ(got[r].comm_forward.messages_sent, got[r].forward.transfers);
    EXPECT_EQ(got[r].comm.bytes_sent, got[r].total.bytes_sent);
    EXPECT_EQ(got[r].comm.messages_sent, got[r].total.transfers);
  }
}

// ---- The model from the definitions ----

// keys[head][pattern]: key positions.
using KeySets = std::vector<std::vector<std::set<int64_t>>>;

// Every token position of rank r.
std::vector<int64_t> Positions(int64_t n, int k, int r, SequenceLayout layout) {
  std::vector<int64_t> positions;
  for (const PositionSpan& span : RankSpans(n, k, r, layout)) {
    for (int64_t t = span.begin; t < span.end; ++t) positions.push_back(t);
  }
  return positions;
}

// The keys of `keys` that some query of `queries` attends, by SPEC section
// 2: pattern i allows (t, u), the block pair is on, and u <= t if causal.
KeySets UsedKeys(const AttentionPattern& pattern, bool causal,
                 const std::vector<int64_t>& queries,
                 const std::vector<int64_t>& keys) {
  KeySets used(pattern.head_patterns.size());
  for (size_t h = 0; h < used.size(); ++h) {
    const std::vector<DilatedPattern>& patterns = pattern.head_patterns[h];
    used[h].resize(patterns.size());
    for (size_t i = 0; i < patterns.size(); ++i) {
      for (int64_t u : keys) {
        for (int64_t t : queries) {
          if (patterns[i].Allows(t, u) && (!causal || u <= t) &&
              (pattern.block_mask == nullptr ||
               pattern.block_mask->Allows(t, u))) {
            used[h][i].insert(u);
            break;
          }
        }
      }
    }
  }
  return used;
}

int64_t Count(const KeySets& keys) {
  int64_t count = 0;
  for (const auto& head : keys) {
    for (const auto& set : head) count += static_cast<int64_t>(set.size());
  }
  return count;
}

void Unite(KeySets& into, const KeySets& from) {
  for (size_t h = 0; h < from.size(); ++h) {
    for (size_t i = 0; i < from[h].size(); ++i) {
      into[h][i].insert(from[h][i].begin(), from[h][i].end());
    }
  }
}

// The expected counters of every rank, from the model.
std::vector<Expected> ModelCounts(const AttentionPattern& pattern, bool causal,
                                  int64_t n, int k, SequenceLayout layout) {
  const auto heads = static_cast<int64_t>(pattern.head_patterns.size());
  std::vector<std::vector<int64_t>> positions;
  for (int r = 0; r < k; ++r) positions.push_back(Positions(n, k, r, layout));
  // used[h][o]
  std::vector<std::vector<KeySets>> used(k, std::vector<KeySets>(k));
  std::vector<int> final_step(k, 0);
  int last_step = 0;
  for (int h = 0; h < k; ++h) {
    for (int o = 0; o < k; ++o) {
      used[h][o] = UsedKeys(pattern, causal, positions[h], positions[o]);
      if (Count(used[h][o]) > 0) {
        const int s = ((h - o) % k + k) % k;
        final_step[o] = std::max(final_step[o], s);
        last_step = std::max(last_step, s);
      }
    }
  }
  // rows[o][s], s = 1 .. final: the rows of a transfer into step s, and
  // whether the chunk travels whole.
  std::vector<std::vector<int64_t>> rows(k);
  std::vector<std::vector<bool>> whole(k);
  for (int o = 0; o < k; ++o) {
    rows[o].assign(final_step[o] + 2, 0);
    whole[o].assign(final_step[o] + 2, false);
    for (int s = 1; s <= final_step[o]; ++s) {
      KeySets keys = used[o][o];
      for (auto& head : keys) {
        for (auto& set : head) set.clear();
      }
      for (int t = s; t <= final_step[o]; ++t)
        Unite(keys, used[(o + t) % k][o]);
      const int64_t all = static_cast<int64_t>(positions[o].size()) * heads;
      whole[o][s] = Count(keys) >= all;
      rows[o][s] = whole[o][s] ? all : Count(keys);
    }
  }
  std::vector<Expected> want(k);
  for (int o = 0; o < k; ++o) {
    bool went_on = false;
    for (int s = 0; s <= final_step[o]; ++s) {
      Expected& holder = want[(o + s) % k];
      if (s < final_step[o]) holder.KeyValue(rows[o][s + 1]);
      if (s == 0) continue;
      const bool live = went_on || Count(used[(o + s) % k][o]) > 0;
      const bool on = live && s < final_step[o] &&
                      whole[o][s] == whole[o][s + 1] &&
                      rows[o][s] == rows[o][s + 1];
      if (live) holder.Grads(rows[o][s]);  // on, or home
      went_on = on;
    }
  }
  for (int r = 0; r < k; ++r) {
    for (int s = 0; s <= last_step; ++s) {
      const bool uses = Count(used[r][((r - s) % k + k) % k]) > 0;
      ++(uses ? want[r].computed : want[r].skipped);
    }
  }
  return want;
}

DilatedOptions Dilated(std::vector<int64_t> segments,
                       std::vector<int64_t> rates,
                       HeadLayout layout = HeadLayout::kAllHeads) {
  DilatedOptions options;
  options.segment_lengths = std::move(segments);
  options.dilation_rates = std::move(rates);
  options.head_layout = layout;
  return options;
}

// Measures every k in {2, 3, 4, 8}, both layouts, causal and not, against
// the model.
void ExpectModel(const std::string& name,
                 const std::function<AttentionPattern(int64_t n)>& build,
                 int64_t n) {
  const AttentionPattern pattern = build(n);
  for (int k : {2, 3, 4, 8}) {
    for (SequenceLayout layout :
         {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
      for (bool causal : {false, true}) {
        SCOPED_TRACE(absl::StrCat(name, " n=", n, " k=", k, " ",
                                  SequenceLayoutName(layout),
                                  causal ? " causal" : ""));
        ExpectCounts(Measure(n, k, layout, pattern, causal),
                     ModelCounts(pattern, causal, n, k, layout));
      }
    }
  }
}

// ---- Hand-derived formulas ----

// (a) Dilated attention whose segments all lie within one chunk (contiguous
// chunks of n / k with segments dividing them; zigzag chunks of n / 2k)
// needs no other rank's keys: last_step = 0, nothing is sent, and the ring
// stops after step 0 (one computed step per pass, none to skip).
TEST(RingCommunicationTest, DilatedWithinChunksSendsNothing) {
  const int64_t n = 64;
  for (int k : {1, 2, 4, 8}) {
    for (SequenceLayout layout :
         {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
      const int64_t chunk = n / (layout == SequenceLayout::kZigzag ? 2 * k : k);
      for (bool causal : {false, true}) {
        SCOPED_TRACE(absl::StrCat("k=", k, " ", SequenceLayoutName(layout),
                                  causal ? " causal" : ""));
        const AttentionPattern pattern = testing::DilatedHeads(
            Dilated({chunk, std::max<int64_t>(chunk / 2, 1)}, {2, 1}), kHeads);
        std::vector<Expected> want(k);
        for (Expected& e : want) e.computed = 1;
        ExpectCounts(Measure(n, k, layout, pattern, causal), want);
      }
    }
  }
}

// (b) Dense, not causal, contiguous: every rank uses every key of every
// chunk, so last_step = k - 1 and each chunk travels whole, k - 1 hops. At
// step s < k - 1 rank r sends K/V of the chunk of origin (r - s) mod k; dK/dV
// go on from steps 1 .. k - 2 and home from the chunk's last holder, rank
// origin - 1, at step k - 1: rank r sends home those of chunk (r + 1) mod k.
// n = 37 so the chunk sizes differ.
TEST(RingCommunicationTest, DenseNonCausalFormula) {
  const int64_t n = 37;
  const auto rows = [&](int k, int origin) {
    return Rows(n, k, ((origin % k) + k) % k, SequenceLayout::kContiguous) *
           kHeads;
  };
  for (int k : {1, 2, 3, 4, 8}) {
    SCOPED_TRACE(absl::StrCat("k=", k));
    std::vector<Expected> want(k);
    for (int r = 0; r < k; ++r) {
      for (int s = 0; s < k - 1; ++s) want[r].KeyValue(rows(k, r - s));
      for (int s = 1; s < k - 1; ++s) want[r].Grads(rows(k, r - s));
      if (k > 1) want[r].Grads(rows(k, r + 1));
      want[r].computed = k;
    }
    ExpectCounts(Measure(n, k, SequenceLayout::kContiguous,
                         testing::DenseHeads(kHeads, n), false),
                 want);
  }
}

// (c) Dense causal, contiguous: holder h uses origin o iff o <= h (then all
// its keys), so last_step = k - 1 (rank k - 1 needs chunk 0) and chunk o
// travels whole while it has later ranks to reach: rank r < k - 1 forwards
// the chunks of origins r, r - 1, ..., 0 (at steps 0..r) and their dK/dV
// from steps 1..r (origins r - 1, ..., 0); rank k - 1 forwards nothing and,
// where every trip ends, sends the gradients of chunks 0..k-2 home. Rank r
// computes r + 1 steps and skips the k - 1 - r whose chunks lie in its
// future.
TEST(RingCommunicationTest, DenseCausalContiguousFormula) {
  const int64_t n = 37;
  for (int k : {1, 2, 3, 4, 8}) {
    SCOPED_TRACE(absl::StrCat("k=", k));
    const auto rows = [&](int origin) {
      return Rows(n, k, origin, SequenceLayout::kContiguous) * kHeads;
    };
    std::vector<Expected> want(k);
    for (int r = 0; r < k; ++r) {
      if (r < k - 1) {
        for (int o = r; o >= 0; --o) want[r].KeyValue(rows(o));
        for (int o = r - 1; o >= 0; --o) want[r].Grads(rows(o));
      } else {
        for (int o = 0; o < k - 1; ++o) want[r].Grads(rows(o));
      }
      want[r].computed = r + 1;
      want[r].skipped = k - 1 - r;
    }
    ExpectCounts(Measure(n, k, SequenceLayout::kContiguous,
                         testing::DenseHeads(kHeads, n), true),
                 want);
  }
}

// (d) Dense causal, zigzag: rank h holds chunks h and 2k-1-h of 2k. Of
// rank o's chunks, a rank h > o uses chunk o whole (it lies before both of
// h's) and nothing of chunk 2k-1-o (it lies after both), a rank h < o both
// whole (they lie before h's second chunk). Every chunk's trip runs k - 1
// steps and, for o >= 1, ends on rank o - 1 < o: rank o's chunks travel
// whole. Rank 0's are used by ranks 1..k-1 only, so they travel cut down to
// chunk 0, as row packing does for a dense pattern. Otherwise as (b), with
// no step skipped.
TEST(RingCommunicationTest, DenseCausalZigzagFormula) {
  const int64_t n = 37;
  for (int k : {2, 3, 4, 8}) {
    SCOPED_TRACE(absl::StrCat("k=", k));
    const auto rows = [&](int origin) {
      origin = ((origin % k) + k) % k;
      const std::vector<PositionSpan> spans =
          RankSpans(n, k, origin, SequenceLayout::kZigzag);
      return (origin == 0 ? spans[0].size()
                          : Rows(n, k, origin, SequenceLayout::kZigzag)) *
             kHeads;
    };
    std::vector<Expected> want(k);
    for (int r = 0; r < k; ++r) {
      for (int s = 0; s < k - 1; ++s) want[r].KeyValue(rows(r - s));
      for (int s = 1; s < k - 1; ++s) want[r].Grads(rows(r - s));
      want[r].Grads(rows(r + 1));
      want[r].computed = k;
    }
    ExpectCounts(Measure(n, k, SequenceLayout::kZigzag,
                         testing::DenseHeads(kHeads, n), true),
                 want);
  }
}

// (e) Dilated segments of two chunks, k = 4 contiguous, not causal, all
// heads with rates 1 and 2: ranks pair up (0, 1) and (2, 3). Rank 1 needs
// chunk 0 one step after it starts, but rank 0 needs chunk 1 at step 3 (the
// ring only turns one way), so last_step = 3; chunks 0 and 2 make one hop,
// chunks 1 and 3 three (relayed by ranks that do not use them). The rate-1
// pattern uses every key, the rate-2 one half of them again: 1.5 x the
// chunk, so chunks travel whole. dK/dV exist only on the ranks that use the
// chunk, so each rank sends one chunk's home: rank 1 chunk 0's, rank 0
// chunk 1's, rank 3 chunk 2's, rank 2 chunk 3's. Each rank computes 2 steps
// and skips 2.
TEST(RingCommunicationTest, DilatedSegmentsOfTwoChunksFormula) {
  const int64_t n = 64, chunk = 16 * kHeads;
  const AttentionPattern pattern =
      testing::DilatedHeads(Dilated({32, 32}, {1, 2}), kHeads);
  std::vector<Expected> want(4);
  for (Expected& e : want) {
    e.KeyValue(chunk);  // 0: chunks 0, 1; 1: 1, 3; 2: 2, 1; 3: 3, 1
    e.KeyValue(chunk);
    e.Grads(chunk);
    e.computed = 2;
    e.skipped = 2;
  }
  ExpectCounts(Measure(n, 4, SequenceLayout::kContiguous, pattern, false),
               want);
}

// (f) The training config's pattern (head groups: segments 256 and 4096,
// rates 1 and 16), n = 8192, k = 4 contiguous, not causal. Head 0's
// segments lie inside chunks of 2048; head 1's segments of 4096 pair the
// chunks up as in (e), and each rank uses the 2048 / 16 = 128 keys of head
// 1 at offset 1 of the other chunk of its pair: every transfer is 128 rows,
// 1/32 of a whole chunk (2 x 2048 rows). Per rank: 2 hops of K and V per
// pass, one dK/dV home.
TEST(RingCommunicationTest, TrainingConfigSendsOneRowInSixteen) {
  const int64_t n = 8192, batch = 1;
  const AttentionPattern pattern = testing::DilatedHeads(
      Dilated({256, 4096}, {1, 16}, HeadLayout::kHeadGroups), kHeads);
  std::vector<Expected> want(4);
  for (Expected& e : want) {
    e.KeyValue(128);
    e.KeyValue(128);
    e.Grads(128);
    e.computed = 2;
    e.skipped = 2;
  }
  const std::vector<RankCounts> got =
      Measure(n, 4, SequenceLayout::kContiguous, pattern, false, batch);
  ExpectCounts(got, want, batch * kHeadDim * 4);
  // Against whole chunks: 32 times less.
  EXPECT_EQ(got[0].total.bytes_sent * 32,
            10 * 2048 * kHeads * batch * kHeadDim * 4);
}

// ---- Against the model ----

BlockSparseOptions Sparse(SparsePattern pattern) {
  BlockSparseOptions options;
  options.pattern = pattern;
  options.block_size = 4;
  options.window = 4;
  options.stride = 3;
  options.global_tokens = 4;
  options.density = 0.3;
  options.seed = 5;
  return options;
}

// Block-sparse patterns: only the key blocks some query block of the
// receiver attends travel.
TEST(RingCommunicationTest, BlockSparseMatchesTheModel) {
  for (SparsePattern sparse :
       {SparsePattern::kLocalWindow, SparsePattern::kGlobalLocal,
        SparsePattern::kRandom, SparsePattern::kDilatedSparse}) {
    const BlockSparseOptions options = Sparse(sparse);
    ExpectModel(
        absl::StrCat("block sparse ", static_cast<int>(sparse)),
        [&](int64_t n) {
          return testing::BlockSparseHeads(options, kHeads, n);
        },
        45);
  }
}

// Dilated patterns: head groups with segments shorter than, about equal to
// and longer than chunks; all heads with every segment at least n (each
// head: rates 2 and 3 over the whole sequence, 1/2 + 1/3 of the rows); and
// a dilated pattern cut by a block mask.
TEST(RingCommunicationTest, DilatedMatchesTheModel) {
  ExpectModel(
      "head groups",
      [](int64_t) {
        return testing::DilatedHeads(
            Dilated({4, 12, 48}, {1, 2, 4}, HeadLayout::kHeadGroups), 3);
      },
      48);
  ExpectModel(
      "all heads, w >= n",
      [](int64_t n) {
        return testing::DilatedHeads(Dilated({n, n + 5}, {2, 3}), kHeads);
      },
      41);
  ExpectModel(
      "dilated and local window",
      [](int64_t n) {
        AttentionPattern p =
            testing::DilatedHeads(Dilated({16, 40}, {1, 2}), kHeads);
        auto mask = MakeBlockMask(Sparse(SparsePattern::kLocalWindow), n);
        p.block_mask = std::make_shared<const BlockMask>(*mask);
        return p;
      },
      40);
}

// RingStats add up over calls (the struct is the caller's accumulator), and
// a call without gradients sends only the forward traffic.
TEST(RingCommunicationTest, StatsAccumulateAcrossCalls) {
  const int64_t n = 24;
  const int k = 3;
  Generator gen = testing::TestGenerator();
  const Shape shape = {kBatch, n, kHeads, kHeadDim};
  const Tensor q = Randn(shape, gen);
  const AttentionPattern pattern = testing::DenseHeads(kHeads, n);
  const absl::Status status = RunRanks(k, [&](Communicator& comm) {
    const Tensor x =
        SplitSequence(q, k, comm.rank(), SequenceLayout::kContiguous);
    RingStats stats;
    RingOptions ring;
    ring.stats = &stats;
    for (int call = 1; call <= 2; ++call) {
      RingAttention(comm, x, x, x, n, pattern, {}, ring);
      // 2 hops of K and V of 8-token chunks per call.
      EXPECT_EQ(stats.bytes_sent, call * 2 * 2 * 8 * kHeads * kRowBytes);
      EXPECT_EQ(stats.transfers, call * 4);
      EXPECT_EQ(stats.steps_computed, call * 3);
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

}  // namespace
}  // namespace lc
