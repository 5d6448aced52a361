#include "distributed/thread_communicator.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/random.h"
#include "core/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/distributed/rank_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::lc::testing::EachRankStatus;
using ::lc::testing::RecvAndWait;
using ::lc::testing::SendAndWait;
using ::lc::testing::TestGenerator;
using ::lc::testing::Timeout;
using ::testing::AllOf;
using ::testing::HasSubstr;

using RankFn = std::function<absl::Status(Communicator&)>;

// Fresh random values of any dtype: normals for floating dtypes, integers in
// [-10^6, 10^6) for int64 and [0, 256) for uint8.
Tensor RandomTensor(const Shape& shape, DType dtype, Generator& gen) {
  if (IsFloating(dtype)) return Randn(shape, gen, dtype);
  std::vector<double> values = Rand(shape, gen, DType::kFloat64).ToVector();
  for (double& v : values) {
    v = dtype == DType::kInt64 ? std::floor(v * 2e6) - 1e6
                               : std::floor(v * 256);
  }
  return FromVector(values, shape, dtype);
}

// The bytes of a contiguous CPU tensor.
std::vector<uint8_t> Bytes(const Tensor& t) {
  const Tensor dense = t.contiguous();
  const uint8_t* p = static_cast<const uint8_t*>(dense.raw_data());
  return std::vector<uint8_t>(p, p + dense.numel() * DTypeSize(t.dtype()));
}

// Same shape, dtype and bytes.
void ExpectBitIdentical(const Tensor& actual, const Tensor& expected,
                        const std::string& what) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  ASSERT_EQ(actual.dtype(), expected.dtype()) << what;
  EXPECT_TRUE(Bytes(actual) == Bytes(expected))
      << what << ": " << actual << " vs expected " << expected;
}

// ---- Point-to-point ----

TEST(SendRecvTest, EveryDtypeArrivesBitExact) {
  Generator gen = TestGenerator();
  const std::vector<DType> dtypes = {DType::kFloat32, DType::kFloat64,
                                     DType::kBFloat16, DType::kInt64,
                                     DType::kUInt8};
  std::vector<Tensor> sent;
  for (DType dtype : dtypes) sent.push_back(RandomTensor({3, 5}, dtype, gen));
  std::vector<Tensor> received;
  for (const Tensor& t : sent) received.push_back(Empty(t.shape(), t.dtype()));
  const absl::Status status = RunRanks(2, [&](Communicator& comm) {
    for (size_t i = 0; i < sent.size(); ++i) {
      const int tag = static_cast<int>(i);
      LC_RETURN_IF_ERROR(comm.rank() == 0
                             ? SendAndWait(comm, sent[i], 1, tag)
                             : RecvAndWait(comm, received[i], 0, tag));
    }
    return absl::OkStatus();
  });
  ASSERT_TRUE(status.ok()) << status;
  for (size_t i = 0; i < sent.size(); ++i) {
    ExpectBitIdentical(received[i], sent[i], DTypeName(dtypes[i]));
  }
}

TEST(SendRecvTest, BadArgumentsAreRejectedAtPost) {
  auto comms = MakeThreadGroup(2, Timeout(200));
  Generator gen = TestGenerator();
  const Tensor strided = Randn({4, 6}, gen).transpose(0, 1);
  ASSERT_FALSE(strided.is_contiguous());

  auto send = comms[0]->Send(strided, 1, 3);
  ASSERT_FALSE(send.ok());
  EXPECT_EQ(send.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(send.status().message(),
              AllOf(HasSubstr("Send from rank 0 to rank 1 (tag 3)"),
                    HasSubstr("[6, 4]"), HasSubstr("strides [1, 6]"),
                    HasSubstr("contiguous")));

  auto recv = comms[1]->Recv(strided, 0, 3);
  ASSERT_FALSE(recv.ok());
  EXPECT_THAT(recv.status().message(),
              AllOf(HasSubstr("Recv on rank 1 from rank 0 (tag 3)"),
                    HasSubstr("contiguous")));

  auto undefined = comms[0]->Send(Tensor(), 1);
  ASSERT_FALSE(undefined.ok());
  EXPECT_THAT(undefined.status().message(), HasSubstr("undefined"));

  auto bad_peer = comms[0]->Send(Zeros({2}), 2);
  ASSERT_FALSE(bad_peer.ok());
  EXPECT_EQ(bad_peer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_peer.status().message(),
              AllOf(HasSubstr("peer rank 2"), HasSubstr("0 <= peer < 2")));
}

// Every rank sends many messages on two tags to every other rank without
// waiting; odd ranks post their receives first, even ranks their sends, and
// receives are posted tag by tag. Each message must arrive at its own buffer
// in posting order.
TEST(SendRecvTest, ManyMessagesInFlightKeepTheirOrderPerPairAndTag) {
  constexpr int kRanks = 3;
  constexpr int kMessages = 40;
  constexpr int kTags = 2;
  // Value of message i of tag t from src to dst.
  const auto value = [](int src, int dst, int tag, int i) {
    return 100000.0 * src + 10000.0 * dst + 1000.0 * tag + i;
  };
  const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
    const int me = comm.rank();
    std::vector<std::unique_ptr<Work>> works;
    std::vector<Tensor> sends;
    std::vector<std::vector<std::vector<Tensor>>> recvs(
        kRanks, std::vector<std::vector<Tensor>>(kTags));
    const auto post_sends = [&]() -> absl::Status {
      for (int i = 0; i < kMessages; ++i) {
        for (int tag = 0; tag < kTags; ++tag) {
          for (int dst = 0; dst < kRanks; ++dst) {
            if (dst == me) continue;
            sends.push_back(Full({2, 3}, value(me, dst, tag, i)));
            LC_ASSIGN_OR_RETURN(auto work, comm.Send(sends.back(), dst, tag));
            works.push_back(std::move(work));
          }
        }
      }
      return absl::OkStatus();
    };
    const auto post_recvs = [&]() -> absl::Status {
      for (int tag = kTags - 1; tag >= 0; --tag) {
        for (int src = 0; src < kRanks; ++src) {
          if (src == me) continue;
          for (int i = 0; i < kMessages; ++i) {
            recvs[src][tag].push_back(Zeros({2, 3}));
            LC_ASSIGN_OR_RETURN(auto work,
                                comm.Recv(recvs[src][tag].back(), src, tag));
            works.push_back(std::move(work));
          }
        }
      }
      return absl::OkStatus();
    };
    if (me % 2 == 1) {
      LC_RETURN_IF_ERROR(post_recvs());
      LC_RETURN_IF_ERROR(post_sends());
    } else {
      LC_RETURN_IF_ERROR(post_sends());
      LC_RETURN_IF_ERROR(post_recvs());
    }
    for (auto& work : works) LC_RETURN_IF_ERROR(work->Wait());
    for (int src = 0; src < kRanks; ++src) {
      if (src == me) continue;
      for (int tag = 0; tag < kTags; ++tag) {
        for (int i = 0; i < kMessages; ++i) {
          const std::vector<double> got = recvs[src][tag][i].ToVector();
          for (double v : got) {
            if (v != value(src, me, tag, i)) {
              return absl::InternalError(absl::StrCat(
                  "message ", i, " of tag ", tag, " from rank ", src, " holds ",
                  v, ", expected ", value(src, me, tag, i)));
            }
          }
        }
      }
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

// Regression for the project this replaces, where K and V shared one
// receive buffer and V overwrote K: a ring of 4 ranks passes (K, V) bundles
// for 3 steps, both sent back to back on the same tag before any wait, into
// separate receive buffers.
TEST(SendRecvTest, KeyAndValueSentBackToBackArriveIntact) {
  constexpr int kRanks = 4;
  Generator gen = TestGenerator();
  std::vector<Tensor> keys, values;
  for (int r = 0; r < kRanks; ++r) {
    keys.push_back(Randn({2, 16, 4}, gen));
    values.push_back(Randn({2, 16, 4}, gen));
  }
  const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
    const int me = comm.rank();
    const int next = (me + 1) % kRanks;
    const int prev = (me + kRanks - 1) % kRanks;
    Tensor k = keys[me], v = values[me];
    for (int step = 1; step < kRanks; ++step) {
      const Tensor k_next = Empty(k.shape()), v_next = Empty(v.shape());
      LC_ASSIGN_OR_RETURN(auto send_k, comm.Send(k, next));
      LC_ASSIGN_OR_RETURN(auto send_v, comm.Send(v, next));
      LC_ASSIGN_OR_RETURN(auto recv_k, comm.Recv(k_next, prev));
      LC_ASSIGN_OR_RETURN(auto recv_v, comm.Recv(v_next, prev));
      for (Work* w : {send_k.get(), send_v.get(), recv_k.get(), recv_v.get()}) {
        LC_RETURN_IF_ERROR(w->Wait());
      }
      const int owner = (me - step + kRanks) % kRanks;
      ExpectBitIdentical(k_next, keys[owner],
                         absl::StrCat("K on rank ", me, " at step ", step));
      ExpectBitIdentical(v_next, values[owner],
                         absl::StrCat("V on rank ", me, " at step ", step));
      k = k_next;
      v = v_next;
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST(SendRecvTest, ShapeOrDtypeMismatchFailsBothSides) {
  struct Case {
    Tensor sent, receive;
    std::string sent_text, receive_text;
  };
  const std::vector<Case> cases = {
      {Zeros({2, 3}), Zeros({3, 2}), "[2, 3] float32 (24 bytes)",
       "[3, 2] float32 (24 bytes)"},
      {Zeros({4}), Zeros({4}, DType::kFloat64), "[4] float32 (16 bytes)",
       "[4] float64 (32 bytes)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.sent_text + " into " + c.receive_text);
    const std::vector<absl::Status> statuses =
        EachRankStatus(2, [&](Communicator& comm) {
          return comm.rank() == 0 ? SendAndWait(comm, c.sent, 1, 7)
                                  : RecvAndWait(comm, c.receive, 0, 7);
        });
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(statuses[r].code(), absl::StatusCode::kInvalidArgument)
          << statuses[r];
      EXPECT_THAT(statuses[r].message(),
                  AllOf(HasSubstr(c.sent_text), HasSubstr(c.receive_text)));
    }
    EXPECT_THAT(statuses[0].message(),
                HasSubstr("Send from rank 0 to rank 1 (tag 7)"));
    EXPECT_THAT(statuses[1].message(),
                HasSubstr("Recv on rank 1 from rank 0 (tag 7)"));
  }
}

// ---- Timeouts and aborts ----

TEST(TimeoutTest, UnmatchedTransfersTimeOutAndAreWithdrawn) {
  auto comms = MakeThreadGroup(2, Timeout(200));
  Generator gen = TestGenerator();
  const Tensor buffer = Zeros({8});
  auto recv = comms[0]->Recv(buffer, 1, 5);
  ASSERT_TRUE(recv.ok()) << recv.status();
  const absl::Time start = absl::Now();
  const absl::Status status = (*recv)->Wait();
  const absl::Duration waited = absl::Now() - start;
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("Recv on rank 0 from rank 1 (tag 5)"),
                    HasSubstr("no matching Send"), HasSubstr("200 ms")));
  EXPECT_GE(waited, absl::Milliseconds(190));
  EXPECT_LT(waited, absl::Seconds(2));
  EXPECT_EQ((*recv)->Wait().code(), absl::StatusCode::kDeadlineExceeded);

  // The withdrawn receive is not matched by a late send: the send times out
  // in turn and the buffer stays untouched.
  auto send = comms[1]->Send(Randn({8}, gen), 0, 5);
  ASSERT_TRUE(send.ok()) << send.status();
  const absl::Status late = (*send)->Wait();
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded) << late;
  EXPECT_THAT(late.message(),
              AllOf(HasSubstr("Send from rank 1 to rank 0 (tag 5)"),
                    HasSubstr("no matching Recv")));
  ExpectBitIdentical(buffer, Zeros({8}), "withdrawn receive buffer");
}

TEST(AbortTest, WakesWaitersAndFailsLaterCalls) {
  auto comms = MakeThreadGroup(3, Timeout(60000));
  auto recv = comms[0]->Recv(Zeros({4}), 1, 2);
  ASSERT_TRUE(recv.ok()) << recv.status();
  absl::Status collective;
  std::thread in_collective([&] { collective = comms[2]->Barrier(); });
  std::thread aborter([&] {
    absl::SleepFor(absl::Milliseconds(50));
    comms[1]->Abort(absl::InvalidArgumentError("stop the test"));
  });
  const absl::Time start = absl::Now();
  const absl::Status waited = (*recv)->Wait();
  in_collective.join();
  aborter.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ(waited.code(), absl::StatusCode::kAborted) << waited;
  EXPECT_THAT(waited.message(),
              AllOf(HasSubstr("Recv on rank 0 from rank 1 (tag 2)"),
                    HasSubstr("stop the test")));
  EXPECT_EQ(collective.code(), absl::StatusCode::kAborted) << collective;
  EXPECT_THAT(collective.message(),
              AllOf(HasSubstr("Barrier"), HasSubstr("on rank 2"),
                    HasSubstr("stop the test")));

  auto send = comms[1]->Send(Zeros({4}), 0);
  ASSERT_FALSE(send.ok());
  EXPECT_EQ(send.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(send.status().message(), HasSubstr("stop the test"));
  const absl::Status later = comms[0]->AllReduceSum(Zeros({4}));
  EXPECT_EQ(later.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(later.message(),
              AllOf(HasSubstr("AllReduceSum"), HasSubstr("stop the test")));
}

// ---- Faults under RunRanks ----

enum class FaultKind { kReturnsError, kThrowsLcError, kThrowsStdException };

// 4 ranks run one ring step, then rank 2 fails while ranks 1 and 3 wait in a
// Recv from it and rank 0 waits in an AllReduceSum. RunRanks must return rank
// 2's error well before the 30 s timeout, the others must see it as Aborted.
void RunFaultScenario(FaultKind fault, absl::StatusCode expected_code,
                      const std::string& expected_text) {
  constexpr int kRanks = 4;
  constexpr int kFailing = 2;
  std::vector<absl::Status> statuses(kRanks);
  const absl::Time start = absl::Now();
  const absl::Status status = RunRanks(
      kRanks,
      [&](Communicator& comm) {
        const int me = comm.rank();
        const Tensor out = Full({16}, me), in = Empty({16});
        LC_ASSIGN_OR_RETURN(auto send, comm.Send(out, (me + 1) % kRanks));
        LC_ASSIGN_OR_RETURN(auto recv,
                            comm.Recv(in, (me + kRanks - 1) % kRanks));
        LC_RETURN_IF_ERROR(send->Wait());
        LC_RETURN_IF_ERROR(recv->Wait());
        if (me == kFailing) {
          absl::SleepFor(absl::Milliseconds(100));
          switch (fault) {
            case FaultKind::kReturnsError:
              return absl::FailedPreconditionError("the data ran out");
            case FaultKind::kThrowsLcError:
              ThrowInvalidArgument("bad shape [3, 3]");
            case FaultKind::kThrowsStdException:
              throw std::runtime_error("out of luck");
          }
        }
        statuses[me] = me == 0 ? comm.AllReduceSum(Zeros({16}))
                               : RecvAndWait(comm, in, kFailing);
        return statuses[me];
      },
      Timeout(30000));
  const absl::Duration elapsed = absl::Now() - start;
  EXPECT_EQ(status.code(), expected_code) << status;
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("rank 2: "), HasSubstr(expected_text)));
  EXPECT_LT(elapsed, absl::Seconds(5));
  for (int r = 0; r < kRanks; ++r) {
    if (r == kFailing) continue;
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kAborted)
        << "rank " << r << ": " << statuses[r];
    EXPECT_THAT(statuses[r].message(), HasSubstr(expected_text));
  }
}

TEST(RunRanksTest, RankReturningAnErrorUnblocksTheOthers) {
  RunFaultScenario(FaultKind::kReturnsError,
                   absl::StatusCode::kFailedPrecondition, "the data ran out");
}

TEST(RunRanksTest, RankThrowingLcErrorKeepsItsCode) {
  RunFaultScenario(FaultKind::kThrowsLcError,
                   absl::StatusCode::kInvalidArgument, "bad shape [3, 3]");
}

TEST(RunRanksTest, RankThrowingStdExceptionIsInternal) {
  RunFaultScenario(FaultKind::kThrowsStdException, absl::StatusCode::kInternal,
                   "out of luck");
}

TEST(RunRanksTest, AllRanksSucceedAndBadSizeIsAnError) {
  std::atomic<int> ran{0};
  const absl::Status ok = RunRanks(5, [&](Communicator& comm) {
    EXPECT_EQ(comm.size(), 5);
    ++ran;
    return comm.Barrier();
  });
  EXPECT_TRUE(ok.ok()) << ok;
  EXPECT_EQ(ran.load(), 5);
  const absl::Status bad =
      RunRanks(0, [](Communicator&) { return absl::OkStatus(); });
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("size 0"));
}

// ---- Collectives ----

// Values spread over many magnitudes, so the order of additions matters in
// float32 and would show in the last bits.
Tensor WideRangeTensor(const Shape& shape, DType dtype, Generator& gen) {
  if (dtype == DType::kInt64) return RandomTensor(shape, dtype, gen);
  std::vector<double> values = Randn(shape, gen, DType::kFloat64).ToVector();
  const std::vector<double> exponents =
      Rand(shape, gen, DType::kFloat64).ToVector();
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] *= std::pow(10.0, std::floor(exponents[i] * 12) - 6);
  }
  return FromVector(values, shape, dtype);
}

TEST(AllReduceSumTest, BitIdenticalAcrossRanksAndRunsAndEqualToFloat64Sum) {
  Generator gen = TestGenerator();
  for (DType dtype :
       {DType::kFloat32, DType::kBFloat16, DType::kFloat64, DType::kInt64}) {
    for (int k : {1, 3, 8}) {
      SCOPED_TRACE(DTypeName(dtype) + " k=" + std::to_string(k));
      std::vector<Tensor> inputs;
      for (int r = 0; r < k; ++r) {
        inputs.push_back(WideRangeTensor({5, 37}, dtype, gen));
      }
      std::vector<double> sum = inputs[0].ToVector();
      for (int r = 1; r < k; ++r) {
        const std::vector<double> x = inputs[r].ToVector();
        for (size_t i = 0; i < sum.size(); ++i) sum[i] += x[i];
      }
      const Tensor expected = FromVector(sum, {5, 37}, dtype);
      for (int run = 0; run < 2; ++run) {
        std::vector<Tensor> results(k);
        const absl::Status status = RunRanks(k, [&](Communicator& comm) {
          results[comm.rank()] = inputs[comm.rank()].clone();
          return comm.AllReduceSum(results[comm.rank()]);
        });
        ASSERT_TRUE(status.ok()) << status;
        for (int r = 0; r < k; ++r) {
          ExpectBitIdentical(results[r], expected,
                             absl::StrCat("run ", run, " rank ", r));
        }
      }
    }
  }
}

TEST(AllReduceSumTest, RejectsUInt8) {
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [](Communicator& comm) {
        return comm.AllReduceSum(Zeros({3}, DType::kUInt8));
      });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), AllOf(HasSubstr("rank 0: "), HasSubstr("uint8")));
  }
}

TEST(AllGatherTest, GathersEveryRankInRankOrder) {
  Generator gen = TestGenerator();
  constexpr int kRanks = 4;
  std::vector<Tensor> inputs;
  for (int r = 0; r < kRanks; ++r) inputs.push_back(Randn({2, 3}, gen));
  std::vector<Tensor> outputs(kRanks);
  const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
    outputs[comm.rank()] = Empty({kRanks, 2, 3});
    return comm.AllGather(inputs[comm.rank()], outputs[comm.rank()]);
  });
  ASSERT_TRUE(status.ok()) << status;
  for (int r = 0; r < kRanks; ++r) {
    for (int src = 0; src < kRanks; ++src) {
      ExpectBitIdentical(outputs[r].slice(0, src, src + 1).squeeze(0),
                         inputs[src], absl::StrCat("rank ", r, " slot ", src));
    }
  }
}

TEST(AllGatherTest, WrongOutputOnOneRankFailsEveryRank) {
  const std::vector<absl::Status> statuses =
      EachRankStatus(3, [](Communicator& comm) {
        const Shape output = comm.rank() == 1 ? Shape{2, 4} : Shape{3, 4};
        return comm.AllGather(Zeros({4}), Zeros(output));
      });
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kInvalidArgument)
        << statuses[r];
    EXPECT_THAT(
        statuses[r].message(),
        AllOf(HasSubstr(absl::StrCat("AllGather (collective #0) on rank ", r)),
              HasSubstr("rank 1: the output [2, 4] float32"),
              HasSubstr("is not [3, 4] float32")));
  }
}

TEST(BroadcastTest, EveryRankGetsTheRootsTensor) {
  Generator gen = TestGenerator();
  constexpr int kRanks = 4;
  for (int root = 0; root < kRanks; ++root) {
    std::vector<Tensor> tensors;
    for (int r = 0; r < kRanks; ++r) tensors.push_back(Randn({3, 2}, gen));
    const Tensor expected = tensors[root].clone();
    const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
      return comm.Broadcast(tensors[comm.rank()], root);
    });
    ASSERT_TRUE(status.ok()) << status;
    for (int r = 0; r < kRanks; ++r) {
      ExpectBitIdentical(tensors[r], expected,
                         absl::StrCat("root ", root, " rank ", r));
    }
  }
}

TEST(BarrierTest, NoRankLeavesBeforeAllArrive) {
  constexpr int kRanks = 5;
  std::atomic<int> arrived{0};
  const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
    for (int round = 1; round <= 3; ++round) {
      absl::SleepFor(absl::Milliseconds(10 * comm.rank()));
      ++arrived;
      LC_RETURN_IF_ERROR(comm.Barrier());
      if (arrived.load() < round * kRanks) {
        return absl::InternalError(absl::StrCat(
            "left barrier ", round, " with ", arrived.load(), " arrivals"));
      }
      LC_RETURN_IF_ERROR(comm.Barrier());
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST(CollectiveTest, MismatchesAreReportedOnEveryRankAndTheGroupGoesOn) {
  constexpr int kRanks = 3;
  std::vector<absl::Status> shape_errors(kRanks), kind_errors(kRanks),
      root_errors(kRanks);
  const std::vector<absl::Status> statuses =
      EachRankStatus(kRanks, [&](Communicator& comm) {
        const int me = comm.rank();
        shape_errors[me] = comm.AllReduceSum(
            me == 1 ? Zeros({4})
                    : (me == 2 ? Zeros({5}, DType::kFloat64) : Zeros({5})));
        kind_errors[me] =
            me == 2 ? comm.Barrier() : comm.AllReduceSum(Zeros({5}));
        root_errors[me] = comm.Broadcast(Zeros({2}), me == 0 ? 1 : 0);
        // The collectives stay aligned after the errors.
        const Tensor ones = Ones({3});
        LC_RETURN_IF_ERROR(comm.AllReduceSum(ones));
        if (ones.ToVector() != std::vector<double>(3, kRanks)) {
          return absl::InternalError("AllReduceSum after the errors is wrong");
        }
        return absl::OkStatus();
      });
  for (int r = 0; r < kRanks; ++r) {
    SCOPED_TRACE(absl::StrCat("rank ", r));
    EXPECT_TRUE(statuses[r].ok()) << statuses[r];
    EXPECT_EQ(shape_errors[r].code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(shape_errors[r].message(),
                AllOf(HasSubstr(absl::StrCat("AllReduceSum (collective #0) on "
                                             "rank ",
                                             r)),
                      HasSubstr("rank 0 [5] float32 (20 bytes)"),
                      HasSubstr("rank 1 [4] float32 (16 bytes)"),
                      HasSubstr("rank 2 [5] float64 (40 bytes)")));
    EXPECT_EQ(kind_errors[r].code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(
        kind_errors[r].message(),
        AllOf(HasSubstr("different collectives"),
              HasSubstr("rank 0 AllReduceSum"), HasSubstr("rank 2 Barrier")));
    EXPECT_EQ(root_errors[r].code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(root_errors[r].message(),
                AllOf(HasSubstr("rank 0 root 1"), HasSubstr("rank 1 root 0")));
  }
}

// Rank 2 arrives at an AllReduceSum only after the others gave up on it:
// all three get DeadlineExceeded naming rank 2, and the next collective works.
TEST(CollectiveTest, LateRankTimesOutEveryRankAndTheGroupGoesOn) {
  constexpr int kRanks = 3;
  std::vector<absl::Status> late_errors(kRanks);
  std::vector<absl::Duration> waited(kRanks);
  absl::Notification gave_up;
  const std::vector<absl::Status> statuses = EachRankStatus(
      kRanks,
      [&](Communicator& comm) {
        const int me = comm.rank();
        if (me == 2 &&
            !gave_up.WaitForNotificationWithTimeout(absl::Seconds(10))) {
          return absl::InternalError("rank 0 never gave up");
        }
        const absl::Time start = absl::Now();
        late_errors[me] = comm.AllReduceSum(Zeros({2}));
        waited[me] = absl::Now() - start;
        if (me == 0) gave_up.Notify();
        return comm.Barrier();
      },
      Timeout(200));
  for (int r = 0; r < kRanks; ++r) {
    SCOPED_TRACE(absl::StrCat("rank ", r));
    EXPECT_TRUE(statuses[r].ok()) << statuses[r];
    EXPECT_EQ(late_errors[r].code(), absl::StatusCode::kDeadlineExceeded)
        << late_errors[r];
    EXPECT_THAT(late_errors[r].message(),
                AllOf(HasSubstr("AllReduceSum (collective #0)"),
                      HasSubstr("rank(s) 2 did not arrive within 200 ms"),
                      HasSubstr("arrived: rank(s) 0, 1")));
    EXPECT_LT(waited[r], absl::Seconds(2));
  }
  EXPECT_GE(waited[0], absl::Milliseconds(190));
}

// ---- Statistics ----

TEST(StatsTest, CountsEveryOperationExactly) {
  constexpr int kRanks = 3;
  auto comms = MakeThreadGroup(kRanks, Timeout(10000));
  std::vector<std::thread> threads;
  std::vector<absl::Status> statuses(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      statuses[r] = [&]() -> absl::Status {
        Communicator& comm = *comms[r];
        comm.ResetStats();
        LC_RETURN_IF_ERROR(comm.Barrier());
        if (r == 0) {
          LC_RETURN_IF_ERROR(SendAndWait(comm, Zeros({4}), 1));  // 16 bytes
          LC_RETURN_IF_ERROR(
              SendAndWait(comm, Zeros({2}, DType::kFloat64), 1));  // 16 bytes
          // A mismatched transfer fails and counts nothing.
          EXPECT_FALSE(SendAndWait(comm, Zeros({3}), 2).ok());
        } else if (r == 1) {
          LC_RETURN_IF_ERROR(RecvAndWait(comm, Empty({4}), 0));
          LC_RETURN_IF_ERROR(RecvAndWait(comm, Empty({2}, DType::kFloat64), 0));
          LC_RETURN_IF_ERROR(
              SendAndWait(comm, Zeros({5}, DType::kInt64), 2));  // 40 bytes
        } else {
          EXPECT_FALSE(RecvAndWait(comm, Empty({4}), 0).ok());
          LC_RETURN_IF_ERROR(RecvAndWait(comm, Empty({5}, DType::kInt64), 1));
        }
        LC_RETURN_IF_ERROR(comm.AllReduceSum(Zeros({10})));  // 40 bytes
        LC_RETURN_IF_ERROR(comm.AllGather(Zeros({3}, DType::kFloat64),
                                          Empty({kRanks, 3}, DType::kFloat64)));
        LC_RETURN_IF_ERROR(comm.Broadcast(Zeros({6}), 1));  // 24 bytes
        return comm.Barrier();
      }();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) ASSERT_TRUE(statuses[r].ok()) << statuses[r];

  // Collectives: AllReduceSum 2 x 40 bytes and AllGather 2 x 24 bytes each
  // way on every rank; Broadcast 2 x 24 sent by rank 1, 24 received by the
  // others.
  struct Expected {
    int64_t bytes_sent, bytes_received, messages_sent, messages_received;
  };
  const Expected expected[kRanks] = {
      {32 + 80 + 48, 80 + 48 + 24, 2 + 2 + 2, 2 + 2 + 1},
      {40 + 80 + 48 + 48, 32 + 80 + 48, 1 + 2 + 2 + 2, 2 + 2 + 2},
      {80 + 48, 40 + 80 + 48 + 24, 2 + 2, 1 + 2 + 2 + 1},
  };
  for (int r = 0; r < kRanks; ++r) {
    SCOPED_TRACE(absl::StrCat("rank ", r));
    const CommStats s = comms[r]->stats();
    EXPECT_EQ(s.bytes_sent, expected[r].bytes_sent);
    EXPECT_EQ(s.bytes_received, expected[r].bytes_received);
    EXPECT_EQ(s.messages_sent, expected[r].messages_sent);
    EXPECT_EQ(s.messages_received, expected[r].messages_received);
    comms[r]->ResetStats();
    const CommStats zero = comms[r]->stats();
    EXPECT_EQ(zero.bytes_sent + zero.bytes_received + zero.messages_sent +
                  zero.messages_received,
              0);
  }
}

}  // namespace
}  // namespace lc
