// Ring attention when something goes wrong: a rank that throws before, in or
// between the passes of the ring, a transfer that fails inside it, ranks
// that disagree on shapes, a rank that never calls, and bad input on one
// rank. Every rank must return an error (the failing rank's own error first)
// promptly, never hang; bad input gets an lc::Error naming the value.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "attention/attention.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/random.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "tests/attention/attention_test_util.h"
#include "tests/distributed/rank_test_util.h"
#include "tests/distributed/ring_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using Clock = std::chrono::steady_clock;
using testing::Timeout;

constexpr int64_t kBatch = 2, kHeads = 3, kHeadDim = 4, kN = 37;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

bool Contains(absl::string_view text, absl::string_view piece) {
  return text.find(piece) != absl::string_view::npos;
}

// Inputs for one group: whole-sequence q, k, v, grad_out.
struct Whole {
  Tensor q, k, v, grad_out;
};

Whole MakeWhole(DType dtype = DType::kFloat32) {
  Generator gen = testing::TestGenerator();
  const Shape shape = {kBatch, kN, kHeads, kHeadDim};
  return {Randn(shape, gen, dtype), Randn(shape, gen, dtype),
          Randn(shape, gen, dtype), Randn(shape, gen, dtype)};
}

// This rank's forward and backward of dense causal ring attention.
void RingForwardBackward(Communicator& comm, const Whole& w,
                         const std::function<void()>& between = nullptr) {
  const int k = comm.size(), r = comm.rank();
  Tensors local;
  for (const Tensor* t : {&w.q, &w.k, &w.v}) {
    Tensor x = SplitSequence(*t, k, r, SequenceLayout::kContiguous).detach();
    x.set_requires_grad(true);
    local.push_back(x);
  }
  AttentionOptions options;
  options.causal = true;
  AttentionResult res = RingAttention(comm, local[0], local[1], local[2], kN,
                                      testing::DenseHeads(kHeads, kN), options);
  if (between) between();
  res.out.backward(
      SplitSequence(w.grad_out, k, r, SequenceLayout::kContiguous));
}

// Runs fn on k ranks; records each rank's own outcome (what it returned or
// threw) besides RunRanks' first failure.
struct GroupOutcome {
  absl::Status first;
  std::vector<absl::Status> ranks;
  double seconds = 0;
};

GroupOutcome RunGroup(int k, const std::function<void(Communicator&)>& fn,
                      const ThreadGroupOptions& options) {
  GroupOutcome outcome;
  outcome.ranks.resize(k);
  const Clock::time_point start = Clock::now();
  outcome.first = RunRanks(
      k,
      [&](Communicator& comm) {
        absl::Status status = StatusFromCall([&] { fn(comm); });
        outcome.ranks[comm.rank()] = status;
        return status;
      },
      options);
  outcome.seconds = SecondsSince(start);
  return outcome;
}

// ---- A rank that fails ----

// A rank throws lc::Error while the others are inside RingAttention (before
// its own call, between its forward and backward, or from a transfer that
// fails inside the ring): RunRanks returns that rank's error, every other
// rank an error too, long before the 2 s timeout (the failure aborts the
// group).
TEST(RingFaultTest, FailingRankStopsEveryRankPromptly) {
  const Whole w = MakeWhole();
  const int k = 4, bad = 2;
  const auto injected = [] {
    throw Error(absl::InternalError("injected failure on rank 2"));
  };
  struct Variant {
    const char* name;
    std::function<void(Communicator&)> fn;
    const char* cause;  // in RunRanks' error
  };
  const std::vector<Variant> variants = {
      {"throws before calling",
       [&](Communicator& comm) {
         if (comm.rank() == bad) {
           // Let the others enter the ring and wait on this rank.
           std::this_thread::sleep_for(std::chrono::milliseconds(50));
           injected();
         }
         RingForwardBackward(comm, w);
       },
       "injected failure on rank 2"},
      {"throws between forward and backward",
       [&](Communicator& comm) {
         RingForwardBackward(comm, w, [&] {
           if (comm.rank() == bad) {
             std::this_thread::sleep_for(std::chrono::milliseconds(50));
             injected();
           }
         });
       },
       "injected failure on rank 2"},
      {"a forward send fails",
       [&](Communicator& comm) {
         testing::FailingCommunicator failing(comm, comm.rank() == bad ? 2 : 0);
         RingForwardBackward(failing, w);
       },
       "injected failure of send 2"},
      {"a backward send fails",
       [&](Communicator& comm) {
         // Rank 2 of 4, causal contiguous: 6 forward sends (K and V of
         // chunks 2, 1, 0), then K and V of chunk 2 in backward step 0 (its
         // own dK and dV stay home); send 9 is step 1's K.
         testing::FailingCommunicator failing(comm, comm.rank() == bad ? 9 : 0);
         RingForwardBackward(failing, w);
       },
       "injected failure of send 9"},
  };
  for (const Variant& variant : variants) {
    SCOPED_TRACE(variant.name);
    const GroupOutcome outcome = RunGroup(k, variant.fn, Timeout(2000));
    EXPECT_LT(outcome.seconds, 1.5);
    // RunRanks' error carries the cause (whichever rank reported first: see
    // RootCauseWinsOverTheAbortsItCaused for which one that should be).
    EXPECT_TRUE(Contains(outcome.first.message(), variant.cause))
        << outcome.first;
    for (int r = 0; r < k; ++r) {
      EXPECT_FALSE(outcome.ranks[r].ok()) << "rank " << r << " succeeded";
      if (r == bad) {
        EXPECT_NE(outcome.ranks[r].code(), absl::StatusCode::kAborted)
            << outcome.ranks[r];
        EXPECT_TRUE(Contains(outcome.ranks[r].message(), variant.cause))
            << outcome.ranks[r];
      } else {
        EXPECT_EQ(outcome.ranks[r].code(), absl::StatusCode::kAborted)
            << "rank " << r << ": " << outcome.ranks[r];
        // The others learn the cause.
        EXPECT_TRUE(Contains(outcome.ranks[r].message(), variant.cause))
            << "rank " << r << ": " << outcome.ranks[r];
      }
    }
  }
}

// A bad input on one rank (here a pattern for another head count: an error
// it finds before any communication) fails every rank at once: its peers,
// already waiting in the ranks' agreement check, learn its error instead of
// blocking there until the timeout (issue 15, defect 2).
TEST(RingFaultTest, BadInputOnOneRankFailsEveryRankAtOnce) {
  const Whole w = MakeWhole();
  const int k = 3, bad = 1;
  // Threads of our own, not RunRanks (which aborts the group when a rank
  // returns an error): as ranks that are processes of their own would be.
  auto comms = MakeThreadGroup(k, Timeout(5000));
  std::vector<absl::Status> statuses(k);
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> threads;
  for (int r = 0; r < k; ++r) {
    threads.emplace_back([&, r] {
      Tensors local;
      for (const Tensor* t : {&w.q, &w.k, &w.v}) {
        local.push_back(SplitSequence(*t, k, r, SequenceLayout::kContiguous));
      }
      if (r == bad) {
        // Let the others enter the agreement check and wait on this rank.
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      statuses[r] = StatusFromCall([&] {
        RingAttention(*comms[r], local[0], local[1], local[2], kN,
                      testing::DenseHeads(r == bad ? kHeads + 1 : kHeads, kN),
                      {});
      });
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_LT(SecondsSince(start), 2.0) << "the others waited for the timeout";
  const char* cause = "the pattern has 4 heads but q has 3";
  for (int r = 0; r < k; ++r) {
    EXPECT_TRUE(Contains(statuses[r].message(), cause))
        << "rank " << r << ": " << statuses[r];
  }
  EXPECT_EQ(statuses[bad].code(), absl::StatusCode::kInvalidArgument);
}

// RunRanks promises the root cause, not the Aborted errors it caused. When
// a transfer fails inside the ring, RingAttention aborts the group itself
// (so that ranks not run by RunRanks stop too) before its exception reaches
// RunRanks; the woken ranks may then report first. Here the failing rank
// takes 100 ms to unwind (as a rank destroying a large graph might), which
// makes that order certain: RunRanks must still return rank 2's
// Unavailable error, not another rank's Aborted one.
TEST(RingFaultTest, RootCauseWinsOverTheAbortsItCaused) {
  const Whole w = MakeWhole();
  const int k = 4, bad = 2;
  const GroupOutcome outcome = RunGroup(
      k,
      [&](Communicator& comm) {
        testing::FailingCommunicator failing(comm, comm.rank() == bad ? 9 : 0);
        try {
          RingForwardBackward(failing, w);
        } catch (const Error&) {
          if (comm.rank() == bad) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
          }
          throw;
        }
      },
      Timeout(2000));
  EXPECT_EQ(outcome.first.code(), absl::StatusCode::kUnavailable)
      << outcome.first;
  EXPECT_TRUE(Contains(outcome.first.message(), "rank 2: ")) << outcome.first;
}

// A rank that returns without ever calling RingAttention: the others' first
// transfer with it times out (DeadlineExceeded, naming the op and peer),
// which aborts the group for the rest; all within about one timeout.
TEST(RingFaultTest, RankThatNeverCallsTimesOut) {
  const Whole w = MakeWhole();
  const int k = 4, absent = 3;
  const int64_t timeout_ms = 300;
  const GroupOutcome outcome = RunGroup(
      k,
      [&](Communicator& comm) {
        if (comm.rank() != absent) RingForwardBackward(comm, w);
      },
      Timeout(timeout_ms));
  EXPECT_GE(outcome.seconds, timeout_ms / 1000.0 * 0.9);
  EXPECT_LT(outcome.seconds, timeout_ms / 1000.0 + 1.0);
  EXPECT_EQ(outcome.first.code(), absl::StatusCode::kDeadlineExceeded)
      << outcome.first;
  EXPECT_TRUE(Contains(outcome.first.message(), "RingAttention on rank"))
      << outcome.first;
  EXPECT_TRUE(outcome.ranks[absent].ok());
  for (int r = 0; r < k; ++r) {
    if (r == absent) continue;
    const absl::Status& s = outcome.ranks[r];
    EXPECT_TRUE(s.code() == absl::StatusCode::kDeadlineExceeded ||
                (s.code() == absl::StatusCode::kAborted &&
                 Contains(s.message(), "DEADLINE_EXCEEDED")))
        << "rank " << r << ": " << s;
  }
}

// ---- Ranks that disagree ----

// One rank passes inputs of another shape or dtype than the others (or too
// many tokens for its place in the layout): every rank returns an error,
// quickly, and the first names the mismatch. The ranks compare their calls
// in one all-gather before the ring starts, so every rank reports a
// mismatch of shape or dtype as InvalidArgument, naming the field and each
// rank's value - also with a dilated pattern whose segments fit inside the
// chunks, where no K/V transfer would ever have revealed it. Too many tokens
// is found by the rank itself before it communicates (the others are then
// aborted by RunRanks).
TEST(RingFaultTest, MismatchedShapesAcrossRanksAreDetected) {
  const int k = 4, odd = 1;
  // Segments of 4 tokens inside chunks of 9 or 10: no rank sends anything.
  const auto local_only = [](int64_t heads) {
    DilatedOptions dilated;
    dilated.segment_lengths = {4};
    dilated.dilation_rates = {1};
    return testing::DilatedHeads(dilated, heads);
  };
  const auto dense = [](int64_t heads) {
    return testing::DenseHeads(heads, kN);
  };
  struct Variant {
    const char* name;
    // Whole-sequence shape and dtype on the odd rank, and extra tokens.
    int64_t heads, head_dim;
    DType dtype;
    int64_t extra_tokens;
    std::function<AttentionPattern(int64_t heads)> pattern;
    const char* expected;
    bool every_rank;  // every rank reports InvalidArgument
  };
  const std::vector<Variant> variants = {
      {"head_dim", kHeads, kHeadDim * 2, DType::kFloat32, 0, dense,
       "disagree on head_dim (4 on ranks 0, 2, 3; 8 on rank 1)", true},
      {"head_dim, no transfer", kHeads, kHeadDim * 2, DType::kFloat32, 0,
       local_only, "disagree on head_dim (4 on ranks 0, 2, 3; 8 on rank 1)",
       true},
      {"heads", kHeads + 1, kHeadDim, DType::kFloat32, 0, dense,
       "disagree on heads (3 on ranks 0, 2, 3; 4 on rank 1)", true},
      {"dtype", kHeads, kHeadDim, DType::kFloat64, 0, dense,
       "disagree on dtype (float32 on ranks 0, 2, 3; float64 on rank 1)", true},
      {"local token count", kHeads, kHeadDim, DType::kFloat32, 1, dense,
       "holds 10 tokens but the contiguous layout of n = 37 gives it 9", false},
  };
  for (const Variant& variant : variants) {
    SCOPED_TRACE(variant.name);
    const GroupOutcome outcome = RunGroup(
        k,
        [&](Communicator& comm) {
          const int r = comm.rank();
          const bool is_odd = r == odd;
          const int64_t heads = is_odd ? variant.heads : kHeads;
          const Shape shape = {
              kBatch,
              RankTokenCount(kN, k, r, SequenceLayout::kContiguous) +
                  (is_odd ? variant.extra_tokens : 0),
              heads, is_odd ? variant.head_dim : kHeadDim};
          const DType dtype = is_odd ? variant.dtype : DType::kFloat32;
          Generator local_gen(r);
          Tensors x;
          for (int i = 0; i < 3; ++i) {
            x.push_back(Randn(shape, local_gen, dtype));
            x.back().set_requires_grad(true);
          }
          AttentionOptions options;
          options.causal = true;
          AttentionResult res = RingAttention(comm, x[0], x[1], x[2], kN,
                                              variant.pattern(heads), options);
          res.out.backward(Randn(shape, local_gen, dtype));
        },
        Timeout(2000));
    EXPECT_LT(outcome.seconds, 1.5);
    // The mismatch itself, or (see RootCauseWinsOverTheAbortsItCaused) an
    // Aborted error that carries it.
    EXPECT_TRUE(outcome.first.code() == absl::StatusCode::kInvalidArgument ||
                Contains(outcome.first.message(), "INVALID_ARGUMENT"))
        << outcome.first;
    EXPECT_TRUE(Contains(outcome.first.message(), variant.expected))
        << outcome.first;
    int mismatch_seen = 0;
    for (int r = 0; r < k; ++r) {
      EXPECT_FALSE(outcome.ranks[r].ok()) << "rank " << r << " succeeded";
      if (outcome.ranks[r].code() == absl::StatusCode::kInvalidArgument) {
        ++mismatch_seen;
        EXPECT_TRUE(Contains(outcome.ranks[r].message(), variant.expected))
            << "rank " << r << ": " << outcome.ranks[r];
      }
    }
    EXPECT_GE(mismatch_seen, variant.every_rank ? k : 1);
  }
}

// One rank disagrees with the others on the options (causal, the pattern)
// or on n (with the same number of local tokens: rank 3 of 4 holds 9 tokens
// of 37 or of 38). Found by the all-gather before the ring starts: every
// rank returns InvalidArgument naming the field, at once (not the
// communicator's timeout, which is long here).
TEST(RingFaultTest, RanksDisagreeingOnOptionsAreInvalidArgument) {
  const Whole w = MakeWhole();
  const int k = 4, odd = 3;
  ASSERT_EQ(RankTokenCount(kN + 1, k, odd, SequenceLayout::kContiguous),
            RankTokenCount(kN, k, odd, SequenceLayout::kContiguous));
  struct Variant {
    const char* what;
    const char* expected;
  };
  for (const Variant& variant : std::vector<Variant>{
           {"causal",
            "disagree on causal (false on ranks 0, 1, 2; true on "
            "rank 3)"},
           {"pattern", "disagree on pattern (fingerprint "},
           {"n", "disagree on n (37 on ranks 0, 1, 2; 38 on rank 3)"}}) {
    const std::string what = variant.what;
    SCOPED_TRACE(what);
    const GroupOutcome outcome = RunGroup(
        k,
        [&](Communicator& comm) {
          const int r = comm.rank();
          AttentionOptions options;
          AttentionPattern pattern = testing::DenseHeads(kHeads, kN);
          int64_t n = kN;
          if (r == odd && what == "causal") options.causal = true;
          if (r == odd && what == "pattern") {
            DilatedOptions dilated;
            dilated.segment_lengths = {10};
            dilated.dilation_rates = {1};
            pattern = testing::DilatedHeads(dilated, kHeads);
          }
          if (r == odd && what == "n") n = kN + 1;
          Tensors local;
          for (const Tensor* t : {&w.q, &w.k, &w.v}) {
            Tensor x =
                SplitSequence(*t, k, r, SequenceLayout::kContiguous).detach();
            x.set_requires_grad(true);
            local.push_back(x);
          }
          AttentionResult res = RingAttention(comm, local[0], local[1],
                                              local[2], n, pattern, options);
          res.out.backward(
              SplitSequence(w.grad_out, k, r, SequenceLayout::kContiguous));
        },
        Timeout(10000));
    EXPECT_LT(outcome.seconds, 1.0);
    for (int r = 0; r < k; ++r) {
      const absl::Status& s = outcome.ranks[r];
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument)
          << "rank " << r << ": " << s;
      EXPECT_TRUE(Contains(s.message(), variant.expected))
          << "rank " << r << ": " << s;
    }
  }
}

// ---- Bad input on one rank ----

// Errors a user can cause, thrown before any communication, naming the value
// and what was expected.
TEST(RingBadInputTest, ClearErrors) {
  auto comms = MakeThreadGroup(2, Timeout(1000));
  Communicator& comm = *comms[0];
  const int64_t n = 37;
  // Rank 0 of 2, zigzag: chunks 0 (10 tokens) and 3 (9 tokens).
  const int64_t local = RankTokenCount(n, 2, 0, SequenceLayout::kZigzag);
  ASSERT_EQ(local, 19);
  Generator gen = testing::TestGenerator();
  const Tensor x = Randn({kBatch, local, kHeads, kHeadDim}, gen);
  const AttentionPattern dense = testing::DenseHeads(kHeads, n);
  RingOptions zigzag;
  zigzag.layout = SequenceLayout::kZigzag;

  // One token short of the layout's count.
  const Tensor short_x = Randn({kBatch, local - 1, kHeads, kHeadDim}, gen);
  testing::ExpectError(
      [&] {
        RingAttention(comm, short_x, short_x, short_x, n, dense, {}, zigzag);
      },
      {"rank 0 of 2", "holds 18 tokens", "zigzag layout of n = 37",
       "gives it 19"});
  const Tensor rank3 = Randn({kBatch, local, kHeads * kHeadDim}, gen);
  testing::ExpectError(
      [&] { RingAttention(comm, rank3, rank3, rank3, n, dense, {}, zigzag); },
      {"q has shape [2, 19, 12]",
       "expected [batch, n_local, heads, head_dim]"});
  testing::ExpectError(
      [&] {
        RingAttention(comm, x, x, x, n, testing::DenseHeads(kHeads + 1, n), {},
                      zigzag);
      },
      {"the pattern has 4 heads but q has 3"});
  const Tensor other = Randn({kBatch, local, kHeads, kHeadDim + 1}, gen);
  testing::ExpectError(
      [&] { RingAttention(comm, x, other, x, n, dense, {}, zigzag); },
      {"[2, 19, 3, 5]", "must have the same shape"});
  // The padding mask covers the whole sequence, not the rank's tokens.
  AttentionCallOptions padded;
  padded.key_padding_mask = Zeros({kBatch, local}, DType::kUInt8);
  testing::ExpectError(
      [&] { RingAttention(comm, x, x, x, n, dense, {}, zigzag, padded); },
      {"key_padding_mask", "[2, 19]", "expected uint8 [2, 37]"});
  // A block mask for another sequence length.
  BlockSparseOptions sparse;
  sparse.block_size = 4;
  const AttentionPattern short_mask =
      testing::BlockSparseHeads(sparse, kHeads, 20);
  testing::ExpectError(
      [&] { RingAttention(comm, x, x, x, n, short_mask, {}, zigzag); },
      {"block mask of 5 blocks of 4 tokens", "does not cover n = 37"});
  testing::ExpectError(
      [&] { RingAttention(comm, x, x, x, -1, dense, {}, zigzag); }, {"n = -1"});
  testing::ExpectError(
      [&] { RingAttention(comm, Tensor(), x, x, n, dense, {}, zigzag); },
      {"q has shape undefined"});
  // Nothing was sent.
  EXPECT_EQ(comm.stats().messages_sent, 0);
}

}  // namespace
}  // namespace lc
