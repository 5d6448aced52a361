// The ring exchange of tensor bundles (distributed/ring_exchange.h) on
// thread ranks: bundle members arrive in their own buffers (K is not
// overwritten by V), the two receive slots alternate and are reused over
// many steps, sizes differ per rank (any n), bytes are counted, and a
// failure in the middle of an exchange becomes an error on every rank
// within the timeout.
#include "distributed/ring_exchange.h"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/distributed/rank_test_util.h"
#include "tests/distributed/ring_test_util.h"

namespace lc {
namespace {

using ::lc::testing::EachRankStatus;
using ::lc::testing::Timeout;
using ::testing::HasSubstr;

using Clock = std::chrono::steady_clock;

// A [rows, 3] tensor whose every element is `value` + its row / 1000.
Tensor Filled(int64_t rows, double value, DType dtype = DType::kFloat64) {
  std::vector<double> values(rows * 3);
  for (int64_t i = 0; i < rows * 3; ++i) values[i] = value + (i / 3) * 1e-3;
  return FromVector(values, {rows, 3}, dtype);
}

// Whether `t` is Filled(rows, value) (same shape and values).
bool IsFilled(const Tensor& t, int64_t rows, double value) {
  const Tensor expected = Filled(rows, value, t.dtype());
  return t.shape() == expected.shape() && t.ToVector() == expected.ToVector();
}

void ExpectAllOk(const std::vector<absl::Status>& statuses) {
  for (size_t r = 0; r < statuses.size(); ++r) {
    EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
  }
}

// The specs of a bundle like `bundle`.
std::vector<TensorSpec> SpecsOf(const std::vector<Tensor>& bundle) {
  std::vector<TensorSpec> specs;
  for (const Tensor& t : bundle) {
    specs.push_back(TensorSpec{t.shape(), t.dtype(), t.device()});
  }
  return specs;
}

// K and V of one bundle, of the same shape and dtype, land in different
// buffers: each holds what the sender's K (resp. V) held. A second bundle of
// members of different dtypes and shapes arrives intact too.
TEST(RingExchangeTest, BundleMembersStayDistinct) {
  const int k = 3;
  const std::vector<absl::Status> statuses =
      EachRankStatus(k, [&](Communicator& c) {
        const int r = c.rank(), prev = (r + k - 1) % k;
        RingExchange exchange(c, 2, /*first_tag=*/1);
        const std::vector<Tensor> mine = {Filled(4, 10 * r + 1),
                                          Filled(4, 10 * r + 2)};
        LC_ASSIGN_OR_RETURN(std::vector<Tensor> got,
                            exchange.Post(mine, SpecsOf(mine)));
        LC_RETURN_IF_ERROR(exchange.Wait());
        EXPECT_TRUE(IsFilled(got[0], 4, 10 * prev + 1)) << "K: " << got[0];
        EXPECT_TRUE(IsFilled(got[1], 4, 10 * prev + 2)) << "V: " << got[1];
        EXPECT_NE(got[0].raw_data(), got[1].raw_data());
        EXPECT_NE(got[0].storage(), got[1].storage());
        // The sent tensors are not written.
        EXPECT_TRUE(IsFilled(mine[0], 4, 10 * r + 1));
        EXPECT_TRUE(IsFilled(mine[1], 4, 10 * r + 2));

        const std::vector<Tensor> mixed = {Filled(2, r, DType::kFloat32),
                                           Filled(5, 100 + r, DType::kFloat64)};
        LC_ASSIGN_OR_RETURN(got, exchange.Post(mixed, SpecsOf(mixed)));
        LC_RETURN_IF_ERROR(exchange.Wait());
        EXPECT_EQ(got[0].dtype(), DType::kFloat32);
        EXPECT_TRUE(IsFilled(got[0], 2, prev));
        EXPECT_TRUE(IsFilled(got[1], 5, 100 + prev));
        return absl::OkStatus();
      });
  ExpectAllOk(statuses);
}

// Over 20 steps each rank passes on the bundle it received the step before,
// as ring attention does: at step s it holds the bundle of rank
// (r - s) mod k. The bundle received at step s stays intact while step
// s + 1's arrives (the other slot), and step s + 2 reuses step s's buffers.
TEST(RingExchangeTest, SlotsAlternateAndAreReusedOverManySteps) {
  const int k = 4, steps = 20;
  const std::vector<absl::Status> statuses =
      EachRankStatus(k, [&](Communicator& c) {
        const int r = c.rank();
        RingExchange exchange(c, 2, /*first_tag=*/7);
        std::vector<Tensor> held = {Filled(6, r), Filled(6, 50 + r)};
        std::vector<const void*> k_buffers;
        for (int s = 0; s < steps; ++s) {
          const int origin = ((r - s) % k + k) % k;
          EXPECT_TRUE(IsFilled(held[0], 6, origin)) << "step " << s;
          EXPECT_TRUE(IsFilled(held[1], 6, 50 + origin)) << "step " << s;
          LC_ASSIGN_OR_RETURN(std::vector<Tensor> next,
                              exchange.Post(held, SpecsOf(held)));
          LC_RETURN_IF_ERROR(exchange.Wait());
          // What this step computes on is unchanged by the arrival.
          EXPECT_TRUE(IsFilled(held[0], 6, origin)) << "step " << s;
          k_buffers.push_back(next[0].raw_data());
          held = next;
        }
        for (int s = 2; s < steps; ++s) {
          EXPECT_EQ(k_buffers[s], k_buffers[s - 2]) << "step " << s;
          EXPECT_NE(k_buffers[s], k_buffers[s - 1]) << "step " << s;
        }
        EXPECT_EQ(exchange.tensors_sent(), 2 * steps);
        return absl::OkStatus();
      });
  ExpectAllOk(statuses);
}

// Ranks hold different numbers of rows (any n, both layouts, ranks with no
// row at all): each receives its predecessor's size, the slot buffers grow
// as needed, and after k - 1 steps every rank has seen every chunk. Bytes
// and tensors sent match the sizes and the communicator's own counts.
TEST(RingExchangeTest, SizesDifferPerRank) {
  for (int64_t n : {37, 5}) {
    for (int k : {2, 3, 4, 8}) {
      for (SequenceLayout layout :
           {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
        SCOPED_TRACE(
            absl::StrCat("n=", n, " k=", k, " ", SequenceLayoutName(layout)));
        const auto rows = [&](int r) {
          return RankTokenCount(n, k, ((r % k) + k) % k, layout);
        };
        const std::vector<absl::Status> statuses =
            EachRankStatus(k, [&](Communicator& c) {
              const int r = c.rank();
              RingExchange exchange(c, 2, /*first_tag=*/1);
              std::vector<Tensor> held = {Filled(rows(r), r),
                                          Filled(rows(r), -r)};
              int64_t bytes = 0;
              for (int s = 0; s < k - 1; ++s) {
                const int incoming = r - s - 1;
                bytes += 2 * held[0].numel() * 8;
                LC_ASSIGN_OR_RETURN(
                    std::vector<Tensor> next,
                    exchange.Post(
                        held,
                        {TensorSpec{{rows(incoming), 3}, DType::kFloat64},
                         TensorSpec{{rows(incoming), 3}, DType::kFloat64}}));
                LC_RETURN_IF_ERROR(exchange.Wait());
                const int origin = ((incoming % k) + k) % k;
                EXPECT_TRUE(IsFilled(next[0], rows(incoming), origin));
                EXPECT_TRUE(IsFilled(next[1], rows(incoming), -origin));
                held = next;
              }
              EXPECT_EQ(exchange.bytes_sent(), bytes);
              EXPECT_EQ(exchange.tensors_sent(), 2 * (k - 1));
              EXPECT_EQ(c.stats().bytes_sent, bytes);
              EXPECT_EQ(c.stats().messages_sent, 2 * (k - 1));
              return absl::OkStatus();
            });
        ExpectAllOk(statuses);
      }
    }
  }
}

// Steps that only send or only receive, or neither, and PostPeers between
// ranks that are not neighbours (what a chunk's gradients use to go home).
TEST(RingExchangeTest, OneSidedStepsAndOtherPeers) {
  const int k = 4;
  const std::vector<absl::Status> statuses =
      EachRankStatus(k, [&](Communicator& c) {
        const int r = c.rank();
        RingExchange exchange(c, 1, /*first_tag=*/3);
        // Rank 0 sends to rank 1, which only receives; the others do nothing.
        const std::vector<Tensor> none;
        const std::vector<TensorSpec> nothing;
        LC_ASSIGN_OR_RETURN(
            std::vector<Tensor> got,
            exchange.Post(
                r == 0 ? std::vector<Tensor>{Filled(2, 7)} : none,
                r == 1 ? std::vector<TensorSpec>{{{2, 3}, DType::kFloat64}}
                       : nothing));
        LC_RETURN_IF_ERROR(exchange.Wait());
        EXPECT_EQ(got.size(), r == 1 ? 1u : 0u);
        if (r == 1) {
          EXPECT_TRUE(IsFilled(got[0], 2, 7));
        }
        // Rank 3 sends to rank 1 (two ranks back).
        LC_ASSIGN_OR_RETURN(
            got, exchange.PostPeers(
                     r == 3 ? std::vector<Tensor>{Filled(1, 3)} : none, 1,
                     r == 1 ? std::vector<TensorSpec>{{{1, 3}, DType::kFloat64}}
                            : nothing,
                     3));
        LC_RETURN_IF_ERROR(exchange.Wait());
        if (r == 1) {
          EXPECT_TRUE(IsFilled(got[0], 1, 3));
        }
        return absl::OkStatus();
      });
  ExpectAllOk(statuses);
}

// A rank that stops in the middle of the exchange (it returns at step 3
// without posting, and without aborting anything): its neighbours' waits
// time out, their exchanges abort the group, and every other rank returns
// an error within about one timeout. A rank whose post fails aborts the
// group at once: the others stop long before the timeout and learn the
// cause.
TEST(RingExchangeTest, FailureMidExchangeIsAnErrorOnEveryRank) {
  const int k = 4, bad = 2;
  const auto ring = [&](Communicator& c, int steps) -> absl::Status {
    RingExchange exchange(c, 2, /*first_tag=*/1);
    std::vector<Tensor> held = {Filled(3, c.rank()), Filled(3, -c.rank())};
    for (int s = 0; s < steps; ++s) {
      LC_ASSIGN_OR_RETURN(std::vector<Tensor> next,
                          exchange.Post(held, SpecsOf(held)));
      LC_RETURN_IF_ERROR(exchange.Wait());
      held = next;
    }
    return absl::OkStatus();
  };
  {
    SCOPED_TRACE("a rank stops");
    const int64_t timeout_ms = 300;
    const Clock::time_point start = Clock::now();
    const std::vector<absl::Status> statuses = EachRankStatus(
        k, [&](Communicator& c) { return ring(c, c.rank() == bad ? 3 : 10); },
        Timeout(timeout_ms));
    const double seconds =
        std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_GE(seconds, timeout_ms / 1000.0 * 0.9);
    EXPECT_LT(seconds, timeout_ms / 1000.0 + 1.0);
    for (int r = 0; r < k; ++r) {
      if (r == bad) {
        EXPECT_TRUE(statuses[r].ok()) << statuses[r];
        continue;
      }
      const absl::Status& s = statuses[r];
      EXPECT_TRUE(s.code() == absl::StatusCode::kDeadlineExceeded ||
                  (s.code() == absl::StatusCode::kAborted &&
                   absl::StrContains(s.message(), "DEADLINE_EXCEEDED")))
          << "rank " << r << ": " << s;
    }
  }
  {
    SCOPED_TRACE("a post fails");
    const Clock::time_point start = Clock::now();
    const std::vector<absl::Status> statuses = EachRankStatus(
        k,
        [&](Communicator& c) {
          // The 7th send: step 3's K.
          testing::FailingCommunicator failing(c, c.rank() == bad ? 7 : 0);
          return ring(failing, 10);
        },
        Timeout(5000));
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 2.0);
    for (int r = 0; r < k; ++r) {
      const absl::Status& s = statuses[r];
      EXPECT_EQ(s.code(), r == bad ? absl::StatusCode::kUnavailable
                                   : absl::StatusCode::kAborted)
          << "rank " << r << ": " << s;
      EXPECT_THAT(std::string(s.message()),
                  HasSubstr("injected failure of send 7"))
          << "rank " << r;
    }
  }
}

// A bundle of the wrong size is refused (and aborts the group); a receive
// spec that does not match what the sender sends fails both sides.
TEST(RingExchangeTest, BadBundles) {
  {
    auto comms = MakeThreadGroup(2, Timeout(1000));
    RingExchange exchange(*comms[0], 2, 1);
    const absl::StatusOr<std::vector<Tensor>> got =
        exchange.Post({Filled(1, 0)}, {});
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(got.status().message()),
                HasSubstr("sends 1 and receives 0 tensors (expected 2 or "
                          "none)"));
    // The group was aborted.
    EXPECT_EQ(comms[1]->Barrier().code(), absl::StatusCode::kAborted);
  }
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& c) {
        RingExchange exchange(c, 1, 1);
        // Rank 0 sends 2 rows and expects 2, rank 1 sends 3 and expects 3.
        LC_ASSIGN_OR_RETURN(
            std::vector<Tensor> got,
            exchange.Post({Filled(c.rank() + 2, 0)},
                          {TensorSpec{{c.rank() + 2, 3}, DType::kFloat64}}));
        return exchange.Wait();
      });
  for (const absl::Status& s : statuses) {
    EXPECT_TRUE(s.code() == absl::StatusCode::kInvalidArgument ||
                s.code() == absl::StatusCode::kAborted)
        << s;
  }
  EXPECT_TRUE(statuses[0].code() == absl::StatusCode::kInvalidArgument ||
              statuses[1].code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lc
