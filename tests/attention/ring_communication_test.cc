// What ring attention sends, against formulas derived from the algorithm of
// attention/ring_attention.cc, per rank, forward and forward + backward:
// RingStats (bytes_sent, transfers, steps_computed, steps_skipped) and, as an
// independent count, the communicator's own CommStats.
//
// The algorithm (k ranks, last_step = the largest (holder - origin) mod k of
// a chunk pair with work): at step s = 0..last_step, rank r holds the chunk
// of origin (r - s) mod k and computes on it when its queries need it (else
// the step counts as skipped). While s < last_step it sends that chunk on to
// r + 1 when some later holder (up to last_step) needs it:
//   forward: K and V (2 transfers);
//   backward: K and V, then dK and dV (4 transfers);
// and after the backward loop, the rank where a chunk's trip ends (the last
// holder, when that is not the owner) sends its dK and dV home (2
// transfers). A chunk of `rows` tokens is rows * B bytes per tensor, with
// B = batch * heads * head_dim * sizeof(dtype).
#include <cstdint>
#include <functional>
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
// float32 rows of [batch, 1, heads, head_dim].
constexpr int64_t kRowBytes = kBatch * kHeads * kHeadDim * 4;

struct RankCounts {
  RingStats forward;  // after the forward call
  RingStats total;    // after forward and backward
  CommStats comm;     // the communicator's, after both
  CommStats comm_forward;
};

// Runs forward, then backward, on k ranks; returns each rank's counters.
std::vector<RankCounts> Measure(int64_t n, int k, SequenceLayout layout,
                                const AttentionPattern& pattern, bool causal) {
  Generator gen = testing::TestGenerator(n * 16 + k);
  const Shape shape = {kBatch, n, kHeads, kHeadDim};
  const Tensor q = Randn(shape, gen), kk = Randn(shape, gen),
               v = Randn(shape, gen), grad_out = Randn(shape, gen);
  std::vector<RankCounts> counts(k);
  const absl::Status status = RunRanks(k, [&](Communicator& comm) {
    const int r = comm.rank();
    Tensors local;
    for (const Tensor* t : {&q, &kk, &v}) {
      Tensor x = SplitSequence(*t, k, r, layout).detach();
      x.set_requires_grad(true);
      local.push_back(x);
    }
    AttentionOptions options;
    options.causal = causal;
    RingStats stats;
    RingOptions ring;
    ring.layout = layout;
    ring.stats = &stats;
    AttentionResult res = RingAttention(comm, local[0], local[1], local[2], n,
                                        pattern, options, ring);
    counts[r].forward = stats;
    counts[r].comm_forward = comm.stats();
    res.out.backward(SplitSequence(grad_out, k, r, layout));
    counts[r].total = stats;
    counts[r].comm = comm.stats();
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
  return counts;
}

int64_t Rows(int64_t n, int k, int rank, SequenceLayout layout) {
  return RankTokenCount(n, k, rank, layout);
}

// The expected counters of one rank: chunks (by origin) it forwards, per
// pass, the chunks whose dK/dV it sends home, and its computed and skipped
// steps per pass.
struct Expected {
  std::vector<int> forwarded;  // origins of the chunks sent on, each pass
  std::vector<int> sent_home;  // origins whose dK/dV this rank sends home
  int64_t computed = 0, skipped = 0;  // per pass
};

void ExpectCounts(const std::vector<RankCounts>& got,
                  const std::vector<Expected>& want, int64_t n,
                  SequenceLayout layout) {
  const int k = static_cast<int>(want.size());
  ASSERT_EQ(static_cast<int>(got.size()), k);
  for (int r = 0; r < k; ++r) {
    SCOPED_TRACE(absl::StrCat("rank ", r, " of ", k));
    int64_t forwarded_rows = 0, home_rows = 0;
    for (int o : want[r].forwarded) forwarded_rows += Rows(n, k, o, layout);
    for (int o : want[r].sent_home) home_rows += Rows(n, k, o, layout);
    const int64_t hops = want[r].forwarded.size();
    const int64_t homes = want[r].sent_home.size();
    // Forward: K and V of each forwarded chunk.
    EXPECT_EQ(got[r].forward.bytes_sent, 2 * forwarded_rows * kRowBytes);
    EXPECT_EQ(got[r].forward.transfers, 2 * hops);
    EXPECT_EQ(got[r].forward.steps_computed, want[r].computed);
    EXPECT_EQ(got[r].forward.steps_skipped, want[r].skipped);
    // Forward + backward: 2 + 4 tensors per hop, 2 per chunk sent home.
    EXPECT_EQ(got[r].total.bytes_sent,
              (6 * forwarded_rows + 2 * home_rows) * kRowBytes);
    EXPECT_EQ(got[r].total.transfers, 6 * hops + 2 * homes);
    EXPECT_EQ(got[r].total.steps_computed, 2 * want[r].computed);
    EXPECT_EQ(got[r].total.steps_skipped, 2 * want[r].skipped);
    // The communicator saw the same.
    EXPECT_EQ(got[r].comm_forward.bytes_sent, got[r].forward.bytes_sent);
    EXPECT_EQ(got[r].comm.bytes_sent, got[r].total.bytes_sent);
    EXPECT_EQ(got[r].comm.messages_sent, got[r].total.transfers);
  }
}

DilatedOptions Dilated(std::vector<int64_t> segments,
                       std::vector<int64_t> rates) {
  DilatedOptions options;
  options.segment_lengths = std::move(segments);
  options.dilation_rates = std::move(rates);
  options.head_layout = HeadLayout::kAllHeads;
  return options;
}

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
        ExpectCounts(Measure(n, k, layout, pattern, causal), want, n, layout);
      }
    }
  }
}

// (b) Dense, not causal, contiguous: every rank needs every chunk, so
// last_step = k - 1 and each chunk makes k - 1 hops. At step s < k - 1 rank r
// sends the chunk of origin (r - s) mod k; its trip ends at step k - 1 on
// rank origin - 1, so rank r sends home the gradients of chunk (r + 1) mod k.
// Per rank: forward 2 * sum_{s<k-1} rows((r-s) mod k) * B bytes in 2(k-1)
// transfers; with backward (6 * that sum + 2 * rows((r+1) mod k)) * B bytes
// in 6(k-1) + 2 transfers. n = 37 so the chunk sizes differ.
TEST(RingCommunicationTest, DenseNonCausalFormula) {
  const int64_t n = 37;
  for (int k : {1, 2, 3, 4, 8}) {
    SCOPED_TRACE(absl::StrCat("k=", k));
    std::vector<Expected> want(k);
    for (int r = 0; r < k; ++r) {
      for (int s = 0; s < k - 1; ++s) {
        want[r].forwarded.push_back(((r - s) % k + k) % k);
      }
      if (k > 1) want[r].sent_home = {(r + 1) % k};
      want[r].computed = k;
    }
    ExpectCounts(Measure(n, k, SequenceLayout::kContiguous,
                         testing::DenseHeads(kHeads, n), false),
                 want, n, SequenceLayout::kContiguous);
  }
}

// (c) Dense causal, contiguous: holder h needs origin o iff o <= h, so
// last_step = k - 1 (rank k - 1 needs chunk 0) and chunk o travels only
// while it has later ranks to reach: rank r < k - 1 forwards the chunks of
// origins r, r - 1, ..., 0 (at steps 0..r), rank k - 1 forwards nothing, and
// every chunk's trip ends on rank k - 1, which sends the gradients of chunks
// 0..k-2 home. Rank r computes r + 1 steps and skips the k - 1 - r steps
// whose chunks lie in its future.
TEST(RingCommunicationTest, DenseCausalContiguousFormula) {
  const int64_t n = 37;
  for (int k : {1, 2, 3, 4, 8}) {
    SCOPED_TRACE(absl::StrCat("k=", k));
    std::vector<Expected> want(k);
    for (int r = 0; r < k; ++r) {
      if (r < k - 1) {
        for (int o = r; o >= 0; --o) want[r].forwarded.push_back(o);
      } else {
        for (int o = 0; o < k - 1; ++o) want[r].sent_home.push_back(o);
      }
      want[r].computed = r + 1;
      want[r].skipped = k - 1 - r;
    }
    ExpectCounts(Measure(n, k, SequenceLayout::kContiguous,
                         testing::DenseHeads(kHeads, n), true),
                 want, n, SequenceLayout::kContiguous);
  }
}

// (d) Dense causal, zigzag: every rank's second chunk (2k-1-r) lies after
// every rank's first chunk, so every rank needs every chunk and the ring runs
// in full, exactly as (b) with zigzag chunk sizes, with no step skipped.
TEST(RingCommunicationTest, DenseCausalZigzagFormula) {
  const int64_t n = 37;
  for (int k : {2, 3, 4, 8}) {
    SCOPED_TRACE(absl::StrCat("k=", k));
    std::vector<Expected> want(k);
    for (int r = 0; r < k; ++r) {
      for (int s = 0; s < k - 1; ++s) {
        want[r].forwarded.push_back(((r - s) % k + k) % k);
      }
      want[r].sent_home = {(r + 1) % k};
      want[r].computed = k;
    }
    ExpectCounts(Measure(n, k, SequenceLayout::kZigzag,
                         testing::DenseHeads(kHeads, n), true),
                 want, n, SequenceLayout::kZigzag);
  }
}

// (e) Dilated segments of two chunks, k = 4 contiguous, not causal: ranks
// pair up (0, 1) and (2, 3). Rank 1 needs chunk 0 one step after it starts,
// but rank 0 needs chunk 1 at step 3 (the ring only turns one way), so
// last_step = 3; chunks 0 and 2 make one hop, chunks 1 and 3 three (relayed
// by ranks that do not use them). Trips end on ranks 1 (chunk 0), 0 (chunk
// 1), 3 (chunk 2), 2 (chunk 3). Each rank computes 2 steps and skips 2.
// Whole chunks travel: the pattern's dilation does not shrink the payload.
TEST(RingCommunicationTest, DilatedSegmentsOfTwoChunksFormula) {
  const int64_t n = 64;
  const AttentionPattern pattern =
      testing::DilatedHeads(Dilated({32, 32}, {1, 2}), kHeads);
  std::vector<Expected> want(4);
  want[0].forwarded = {0, 3};
  want[1].forwarded = {1, 3};
  want[2].forwarded = {2, 1};
  want[3].forwarded = {3, 1};
  want[0].sent_home = {1};
  want[1].sent_home = {0};
  want[2].sent_home = {3};
  want[3].sent_home = {2};
  for (Expected& e : want) {
    e.computed = 2;
    e.skipped = 2;
  }
  ExpectCounts(Measure(n, 4, SequenceLayout::kContiguous, pattern, false), want,
               n, SequenceLayout::kContiguous);
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
      EXPECT_EQ(stats.bytes_sent, call * 2 * 2 * 8 * kRowBytes);
      EXPECT_EQ(stats.transfers, call * 4);
      EXPECT_EQ(stats.steps_computed, call * 3);
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

}  // namespace
}  // namespace lc
