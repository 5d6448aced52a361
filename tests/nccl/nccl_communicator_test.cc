// The NCCL backend. Argument checks run everywhere; the rest needs GPUs and
// skips itself without them (with LC_REQUIRE_GPU=1 in the environment a
// machine with no GPU fails instead): one GPU for the world-size-1
// communicator (and ring attention over it), two or more for RunNcclRanks
// and for one process per rank (this binary re-executed with RANK,
// WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
#include "distributed/nccl_communicator.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "attention/attention.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/random.h"
#include "core/status.h"
#include "core/tensor.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr milliseconds kTimeout(60000);
// Set in the environment of the processes the multi-process test starts.
constexpr char kChildVariable[] = "LC_NCCL_TEST_CHILD";

bool GpuRequired() {
  const char* required = std::getenv("LC_REQUIRE_GPU");
  return required != nullptr && std::string(required) == "1";
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

NcclUniqueId ZeroId() {
  return *NcclUniqueId::FromBytes(std::string(kNcclUniqueIdBytes, '\0'));
}

std::vector<double> Host(const Tensor& t) {
  return t.to(Device::Cpu()).ToVector();
}

#define EXPECT_STATUS(status, expected_code, fragment)              \
  do {                                                              \
    const absl::Status s_ = (status);                               \
    EXPECT_EQ(s_.code(), (expected_code)) << s_;                    \
    EXPECT_TRUE(absl::StrContains(s_.message(), (fragment))) << s_; \
  } while (false)

// ---- Everywhere: arguments ----

TEST(NcclArgumentsTest, UniqueIdHasExactly128Bytes) {
  EXPECT_TRUE(NcclUniqueId::FromBytes(std::string(128, 'x')).ok());
  EXPECT_STATUS(NcclUniqueId::FromBytes("short").status(),
                absl::StatusCode::kInvalidArgument,
                "an NCCL unique id has 128 bytes, got 5");
}

TEST(NcclArgumentsTest, CreateRejectsBadArguments) {
  EXPECT_STATUS(CreateNcclCommunicator(0, 0, 0, ZeroId(), kTimeout).status(),
                absl::StatusCode::kInvalidArgument, "size 0 must be >= 1");
  EXPECT_STATUS(CreateNcclCommunicator(2, 2, 0, ZeroId(), kTimeout).status(),
                absl::StatusCode::kInvalidArgument,
                "rank 2 is out of range (expected 0 <= rank < size=2)");
  EXPECT_STATUS(
      CreateNcclCommunicator(0, 1, 0, ZeroId(), milliseconds(0)).status(),
      absl::StatusCode::kInvalidArgument, "timeout 0 ms must be positive");
  const int devices = CudaDeviceCount();
  EXPECT_STATUS(
      CreateNcclCommunicator(0, 1, devices, ZeroId(), kTimeout).status(),
      absl::StatusCode::kFailedPrecondition,
      absl::StrCat("CUDA device ", devices, ", which does not exist (this ",
                   "machine has ", devices, " CUDA devices)"));
}

TEST(NcclArgumentsTest, RunNcclRanksNeedsOneDevicePerRank) {
  const auto fn = [](Communicator&) { return absl::OkStatus(); };
  EXPECT_STATUS(RunNcclRanks(0, fn), absl::StatusCode::kInvalidArgument,
                "k=0 must be >= 1");
  const int k = CudaDeviceCount() + 1;
  EXPECT_STATUS(RunNcclRanks(k, fn), absl::StatusCode::kFailedPrecondition,
                absl::StrCat("k=", k, " ranks need one CUDA device each"));
}

TEST(NcclArgumentsTest, FromEnvNamesMissingVariablesAndMissingDevices) {
  const char* names[] = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "LOCAL_RANK"};
  std::vector<std::pair<std::string, std::string>> saved;
  for (const char* name : names) {
    if (const char* value = std::getenv(name)) saved.emplace_back(name, value);
    unsetenv(name);
  }
  setenv("WORLD_SIZE", "2", 1);
  EXPECT_STATUS(CreateNcclCommunicatorFromEnv(kTimeout).status(),
                absl::StatusCode::kInvalidArgument,
                "environment variables RANK, MASTER_ADDR, MASTER_PORT are not "
                "set");
  setenv("RANK", "1", 1);
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", "29500", 1);
  const std::string local_rank = std::to_string(CudaDeviceCount());
  setenv("LOCAL_RANK", local_rank.c_str(), 1);
  EXPECT_STATUS(CreateNcclCommunicatorFromEnv(kTimeout).status(),
                absl::StatusCode::kFailedPrecondition,
                absl::StrCat("LOCAL_RANK=", local_rank));
  for (const char* name : names) unsetenv(name);
  for (const auto& [name, value] : saved) {
    setenv(name.c_str(), value.c_str(), 1);
  }
}

// ---- One GPU: a world of one rank ----

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() > 0) return;
    if (GpuRequired()) {
      FAIL() << "LC_REQUIRE_GPU=1 but no CUDA device is visible";
    }
    GTEST_SKIP() << "no CUDA device";
  }

  // A world-size-1 communicator on cuda:0.
  static std::unique_ptr<Communicator> Solo(milliseconds timeout = kTimeout) {
    auto id = NewNcclUniqueId();
    EXPECT_TRUE(id.ok()) << id.status();
    auto communicator = CreateNcclCommunicator(0, 1, 0, *id, timeout);
    EXPECT_TRUE(communicator.ok()) << communicator.status();
    return communicator.ok() ? std::move(*communicator) : nullptr;
  }

  static Tensor Cuda(const std::vector<double>& values, const Shape& shape,
                     DType dtype = DType::kFloat32, int device = 0) {
    return FromVector(values, shape, dtype).to(Device::Cuda(device));
  }
};

TEST_F(NcclTest, SendToItselfArrivesMatchedByTag) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  const Tensor a = Cuda({1, 2, 3, 4, 5, 6}, {2, 3});
  const Tensor b = Cuda({7, 8}, {2});
  const Tensor a_in = Zeros({2, 3}, DType::kFloat32, Device::Cuda(0));
  const Tensor b_in = Zeros({2}, DType::kFloat32, Device::Cuda(0));
  // Posted in different orders per tag; receives posted before or after.
  auto recv_b = c->Recv(b_in, 0, /*tag=*/1);
  auto send_a = c->Send(a, 0, /*tag=*/0);
  auto send_b = c->Send(b, 0, /*tag=*/1);
  auto recv_a = c->Recv(a_in, 0, /*tag=*/0);
  for (auto* work : {&recv_b, &send_a, &send_b, &recv_a}) {
    ASSERT_TRUE(work->ok()) << work->status();
    EXPECT_TRUE((**work)->Wait().ok());
  }
  EXPECT_EQ(Host(a_in), Host(a));
  EXPECT_EQ(Host(b_in), Host(b));
  const CommStats stats = c->stats();
  EXPECT_EQ(stats.messages_sent, 2);
  EXPECT_EQ(stats.messages_received, 2);
  EXPECT_EQ(stats.bytes_sent, 32);
  EXPECT_EQ(stats.bytes_received, 32);
  c->ResetStats();
  EXPECT_EQ(c->stats().bytes_sent, 0);
}

TEST_F(NcclTest, LargeSendToItselfInEveryDtype) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  const int64_t n = int64_t{1} << 22;
  std::vector<double> pattern(n);
  for (int64_t i = 0; i < n; ++i) pattern[i] = i % 200;
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kBFloat16,
                      DType::kInt64, DType::kUInt8}) {
    const Tensor src = FromVector(pattern, {n}, dtype).to(Device::Cuda(0));
    const Tensor dst = Zeros({n}, dtype, Device::Cuda(0));
    auto send = c->Send(src, 0);
    auto recv = c->Recv(dst, 0);
    ASSERT_TRUE(send.ok() && recv.ok()) << DTypeName(dtype);
    EXPECT_TRUE((*recv)->Wait().ok()) << DTypeName(dtype);
    EXPECT_TRUE((*send)->Wait().ok()) << DTypeName(dtype);
    EXPECT_EQ(Host(dst), Host(src)) << DTypeName(dtype);
  }
}

TEST_F(NcclTest, SendToItselfWithAnotherDtypeFailsBothSides) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  auto send = c->Send(Zeros({4}, DType::kFloat32, Device::Cuda(0)), 0);
  auto recv = c->Recv(Zeros({4}, DType::kFloat64, Device::Cuda(0)), 0);
  ASSERT_TRUE(send.ok() && recv.ok());
  for (auto* work : {&send, &recv}) {
    const absl::Status status = (**work)->Wait();
    EXPECT_STATUS(status, absl::StatusCode::kInvalidArgument,
                  "the sent tensor [4] float32 (16 bytes) does not match the "
                  "receive tensor [4] float64 (32 bytes)");
  }
  // A mismatch to itself is local: the communicator goes on.
  EXPECT_TRUE(c->Barrier().ok());
}

TEST_F(NcclTest, CollectivesOfOneRank) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  for (DType dtype :
       {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kInt64}) {
    const Tensor t = Cuda({1, -2, 3}, {3}, dtype);
    ASSERT_TRUE(c->AllReduceSum(t).ok()) << DTypeName(dtype);
    EXPECT_EQ(Host(t), (std::vector<double>{1, -2, 3})) << DTypeName(dtype);
  }
  const Tensor input = Cuda({4, 5, 6}, {3}, DType::kUInt8);
  const Tensor output = Zeros({1, 3}, DType::kUInt8, Device::Cuda(0));
  ASSERT_TRUE(c->AllGather(input, output).ok());
  EXPECT_EQ(Host(output), (std::vector<double>{4, 5, 6}));
  const Tensor b = Cuda({9, 8}, {2}, DType::kInt64);
  ASSERT_TRUE(c->Broadcast(b, 0).ok());
  EXPECT_EQ(Host(b), (std::vector<double>{9, 8}));
  EXPECT_TRUE(c->Barrier().ok());
  // Empty tensors pass through.
  EXPECT_TRUE(
      c->AllReduceSum(Zeros({0, 3}, DType::kFloat32, Device::Cuda(0))).ok());
  // Size 1: no peers, nothing counted.
  EXPECT_EQ(c->stats().bytes_sent, 0);
}

TEST_F(NcclTest, BadTensorsAreClearErrorsAndTheCommunicatorGoesOn) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  EXPECT_STATUS(c->AllReduceSum(Ones({3})), absl::StatusCode::kInvalidArgument,
                "the tensor [3] float32 (12 bytes) is on cpu but the NCCL "
                "communicator of rank 0 runs on cuda:0");
  EXPECT_STATUS(c->Send(Ones({3}), 0).status(),
                absl::StatusCode::kInvalidArgument,
                "Send from rank 0 to rank 0 (tag 0): the tensor [3] float32 "
                "(12 bytes) is on cpu");
  const Tensor matrix = Zeros({2, 3}, DType::kFloat32, Device::Cuda(0));
  EXPECT_STATUS(c->Recv(matrix.transpose(0, 1), 0).status(),
                absl::StatusCode::kInvalidArgument,
                "expected a contiguous tensor");
  EXPECT_STATUS(c->Send(matrix, 1).status(), absl::StatusCode::kInvalidArgument,
                "peer rank 1 is out of range (expected 0 <= peer < 1)");
  EXPECT_STATUS(c->AllReduceSum(Zeros({3}, DType::kUInt8, Device::Cuda(0))),
                absl::StatusCode::kInvalidArgument,
                "AllReduceSum (collective #1) on rank 0: the tensor is uint8");
  EXPECT_STATUS(
      c->AllGather(matrix, Zeros({2, 3}, DType::kFloat32, Device::Cuda(0))),
      absl::StatusCode::kInvalidArgument,
      "the output [2, 3] float32 (24 bytes) does not fit the input "
      "[2, 3] float32 (24 bytes) (expected [1, 2, 3] float32)");
  EXPECT_STATUS(c->Broadcast(matrix, 1), absl::StatusCode::kInvalidArgument,
                "root 1 is out of range");
  if (CudaDeviceCount() >= 2) {
    EXPECT_STATUS(c->AllReduceSum(Zeros({3}, DType::kFloat32, Device::Cuda(1))),
                  absl::StatusCode::kInvalidArgument, "is on cuda:1 but");
  }
  // None of that broke the communicator.
  const Tensor t = Cuda({1, 2}, {2});
  EXPECT_TRUE(c->AllReduceSum(t).ok());
  EXPECT_EQ(Host(t), (std::vector<double>{1, 2}));
}

TEST_F(NcclTest, UnmatchedSendTimesOutAndLaterCallsAreAborted) {
  auto c = Solo(milliseconds(300));
  ASSERT_NE(c, nullptr);
  auto send = c->Send(Zeros({4}, DType::kFloat32, Device::Cuda(0)), 0);
  ASSERT_TRUE(send.ok());
  const Clock::time_point start = Clock::now();
  EXPECT_STATUS((*send)->Wait(), absl::StatusCode::kDeadlineExceeded,
                "Send from rank 0 to rank 0 (tag 0): [4] float32 (16 bytes) "
                "did not complete within 300 ms");
  EXPECT_LT(SecondsSince(start), 5.0);
  EXPECT_STATUS(c->Barrier(), absl::StatusCode::kAborted, "DEADLINE_EXCEEDED");
  EXPECT_STATUS(
      c->Recv(Zeros({4}, DType::kFloat32, Device::Cuda(0)), 0).status(),
      absl::StatusCode::kAborted, "was aborted");
}

TEST_F(NcclTest, AbortCarriesTheReason) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  auto recv = c->Recv(Zeros({4}, DType::kFloat32, Device::Cuda(0)), 0);
  ASSERT_TRUE(recv.ok());
  c->Abort(absl::InternalError("the data loader broke"));
  EXPECT_STATUS((*recv)->Wait(), absl::StatusCode::kAborted,
                "the data loader broke");
  EXPECT_STATUS(c->Barrier(), absl::StatusCode::kAborted,
                "the data loader broke");
  // A Work outliving its communicator reports the abort too.
  auto late = c->Recv(Zeros({4}, DType::kFloat32, Device::Cuda(0)), 0);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kAborted);
  c.reset();
  EXPECT_EQ((*recv)->Wait().code(), absl::StatusCode::kAborted);
}

// Ring attention over a world of one NCCL rank on CUDA tensors (no K/V
// travels: the one rank holds every chunk) equals single-rank Attention,
// forward and backward, in float32 and in bfloat16 (computed natively), for
// dense and for causal dilated attention (all heads: two patterns per head).
TEST_F(NcclTest, RingAttentionOfOneRankEqualsAttention) {
  auto c = Solo();
  ASSERT_NE(c, nullptr);
  const int64_t batch = 2, n = 97, heads = 4, head_dim = 64;
  AttentionPattern dense;
  dense.head_patterns.assign(heads, {DensePattern(n)});
  DilatedOptions dilated_options;
  dilated_options.segment_lengths = {32, n};
  dilated_options.dilation_rates = {1, 4};
  dilated_options.head_layout = HeadLayout::kAllHeads;
  AttentionPattern dilated;
  dilated.head_patterns = *DilatedHeadPatterns(dilated_options, heads);
  for (const AttentionPattern* pattern : {&dense, &dilated}) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      SCOPED_TRACE(absl::StrCat(pattern == &dense ? "dense" : "dilated", ", ",
                                DTypeName(dtype)));
      Generator gen(7);
      const Shape shape = {batch, n, heads, head_dim};
      std::vector<Tensor> inputs;
      for (int i = 0; i < 4; ++i) {
        inputs.push_back(
            Randn(shape, gen, DType::kFloat32).to(dtype).to(Device::Cuda(0)));
      }
      const Tensor grad_lse =
          Randn({batch, heads, n}, gen, DType::kFloat32).to(Device::Cuda(0));
      AttentionOptions options;
      options.causal = pattern == &dilated;
      // out, lse and the gradients of q, k, v of `attend` on fresh leaves.
      const auto run =
          [&](const std::function<AttentionResult(const Tensor&, const Tensor&,
                                                  const Tensor&)>& attend) {
            std::vector<Tensor> leaves;
            for (int i = 0; i < 3; ++i) {
              leaves.push_back(inputs[i].detach().set_requires_grad(true));
            }
            const AttentionResult r = attend(leaves[0], leaves[1], leaves[2]);
            Backward({r.out, r.lse}, {inputs[3], grad_lse});
            return std::vector<Tensor>{r.out, r.lse, leaves[0].grad(),
                                       leaves[1].grad(), leaves[2].grad()};
          };
      const std::vector<Tensor> want =
          run([&](const Tensor& q, const Tensor& k, const Tensor& v) {
            return Attention(q, k, v, *pattern, options);
          });
      const std::vector<Tensor> got =
          run([&](const Tensor& q, const Tensor& k, const Tensor& v) {
            return RingAttention(*c, q, k, v, n, *pattern, options);
          });
      // float32: the same kernels on the same tiles; bfloat16: out and the
      // gradients are rounded from float32 accumulators instead of written
      // once, a difference of at most one bfloat16 rounding.
      const double tol = dtype == DType::kFloat32 ? 1e-5 : 2e-2;
      const char* names[] = {"out", "lse", "grad q", "grad k", "grad v"};
      for (int i = 0; i < 5; ++i) {
        ASSERT_EQ(got[i].device(), Device::Cuda(0)) << names[i];
        ASSERT_EQ(got[i].dtype(), want[i].dtype()) << names[i];
        const std::vector<double> a = Host(got[i]), e = Host(want[i]);
        ASSERT_EQ(a.size(), e.size()) << names[i];
        double diff = 0, norm = 0;
        for (size_t j = 0; j < a.size(); ++j) {
          if (std::isinf(e[j])) {
            EXPECT_EQ(a[j], e[j]) << names[i] << " element " << j;
            continue;
          }
          diff += (a[j] - e[j]) * (a[j] - e[j]);
          norm += e[j] * e[j];
        }
        EXPECT_LE(std::sqrt(diff), tol * std::sqrt(norm)) << names[i];
      }
    }
  }
  // Nothing travelled.
  EXPECT_EQ(c->stats().bytes_sent, 0);
}

TEST_F(NcclTest, RankThatNeverJoinsIsADeadlineWithinTheTimeout) {
  auto id = NewNcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  const Clock::time_point start = Clock::now();
  // Rank 1 of 2 never starts.
  const auto c = CreateNcclCommunicator(0, 2, 0, *id, milliseconds(1000));
  EXPECT_STATUS(c.status(), absl::StatusCode::kDeadlineExceeded,
                "rank 0 of 2 (cuda:0) joining the NCCL group did not finish "
                "within 1000 ms");
  EXPECT_LT(SecondsSince(start), 30.0);
}

// ---- Two or more GPUs ----

class NcclMultiGpuTest : public NcclTest {
 protected:
  void SetUp() override {
    NcclTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    if (CudaDeviceCount() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  }
  static int Ranks() { return std::min(CudaDeviceCount(), 8); }
};

// Every rank passes K and V around the whole ring, both directions in flight
// at once, with messages far larger than NCCL's buffers: a deadlock if sends
// and receives were serialized on one NCCL communicator.
absl::Status RingExchange(Communicator& c, int64_t n) {
  const int rank = c.rank();
  const int size = c.size();
  const Device device = Device::Cuda(rank);
  const auto value = [](int owner, int which) { return owner * 10.0 + which; };
  c.ResetStats();
  Tensor k = Full({n}, value(rank, 0), DType::kFloat32, device);
  Tensor v = Full({n}, value(rank, 1), DType::kFloat32, device);
  for (int step = 1; step < size; ++step) {
    const Tensor k_next = Empty({n}, DType::kFloat32, device);
    const Tensor v_next = Empty({n}, DType::kFloat32, device);
    const int next = (rank + 1) % size;
    const int prev = (rank + size - 1) % size;
    std::vector<absl::StatusOr<std::unique_ptr<Work>>> works;
    works.push_back(c.Send(k, next, 0));
    works.push_back(c.Send(v, next, 1));
    works.push_back(c.Recv(k_next, prev, 0));
    works.push_back(c.Recv(v_next, prev, 1));
    for (const auto& work : works) LC_RETURN_IF_ERROR(work.status());
    for (const auto& work : works) LC_RETURN_IF_ERROR((*work)->Wait());
    const int owner = (rank - step + size) % size;
    for (const auto& [t, which] :
         {std::pair(k_next, 0), std::pair(v_next, 1)}) {
      const double first = t.at({0});
      const double last = t.at({n - 1});
      if (first != value(owner, which) || last != value(owner, which)) {
        return absl::InternalError(
            absl::StrCat("rank ", rank, " step ", step, ": got ", first, "..",
                         last, " expected ", value(owner, which)));
      }
    }
    k = k_next;
    v = v_next;
  }
  const CommStats stats = c.stats();
  const int64_t expected = int64_t{2} * (size - 1) * n * 4;
  if (stats.bytes_sent != expected || stats.bytes_received != expected) {
    return absl::InternalError(
        absl::StrCat("rank ", rank, ": sent ", stats.bytes_sent, " received ",
                     stats.bytes_received, " bytes, expected ", expected));
  }
  return absl::OkStatus();
}

TEST_F(NcclMultiGpuTest, RingSendRecvOfLargeTensors) {
  EXPECT_TRUE(RunNcclRanks(Ranks(), [](Communicator& c) {
                return RingExchange(c, int64_t{1} << 24);  // 64 MiB each
              }).ok());
}

TEST_F(NcclMultiGpuTest, CollectivesAcrossRanks) {
  const int k = Ranks();
  const absl::Status status = RunNcclRanks(k, [k](Communicator& c) {
    const Device device = Device::Cuda(c.rank());
    const double sum = k * (k + 1) / 2.0;
    for (DType dtype :
         {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kInt64}) {
      const Tensor t = Full({1000}, c.rank() + 1, dtype, device);
      LC_RETURN_IF_ERROR(c.AllReduceSum(t));
      if (t.at({999}) != sum) {
        return absl::InternalError(
            absl::StrCat(DTypeName(dtype), " sum ", t.at({999}), " != ", sum));
      }
    }
    const Tensor input = Full({2, 3}, c.rank(), DType::kInt64, device);
    const Tensor output = Zeros({k, 2, 3}, DType::kInt64, device);
    LC_RETURN_IF_ERROR(c.AllGather(input, output));
    for (int r = 0; r < k; ++r) {
      if (output.at({r, 1, 2}) != r) {
        return absl::InternalError(absl::StrCat("gathered row ", r));
      }
    }
    const Tensor b =
        Full({5}, c.rank() == k - 1 ? 42 : 0, DType::kFloat32, device);
    LC_RETURN_IF_ERROR(c.Broadcast(b, k - 1));
    if (b.at({4}) != 42) return absl::InternalError("broadcast value");
    LC_RETURN_IF_ERROR(c.Barrier());
    const CommStats stats = c.stats();
    // 4 all-reduces of 1000 elements (4+8+2+8 bytes) and one all-gather of
    // 48 bytes, to and from each of k - 1 peers; the broadcast of 20 bytes.
    const int64_t exchanged = (k - 1) * (1000 * (4 + 8 + 2 + 8) + 48);
    const int64_t broadcast = c.rank() == k - 1 ? 0 : 20;
    const int64_t broadcast_sent = c.rank() == k - 1 ? (k - 1) * 20 : 0;
    if (stats.bytes_sent != exchanged + broadcast_sent ||
        stats.bytes_received != exchanged + broadcast) {
      return absl::InternalError(absl::StrCat("stats: sent ", stats.bytes_sent,
                                              " received ",
                                              stats.bytes_received));
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

TEST_F(NcclMultiGpuTest, MismatchedCollectivesFailOnEveryRank) {
  const int k = Ranks();
  std::vector<absl::Status> shapes(k), kinds(k), after(k);
  const absl::Status status = RunNcclRanks(k, [&](Communicator& c) {
    const Device device = Device::Cuda(c.rank());
    // Rank 1 passes one more element.
    shapes[c.rank()] =
        c.AllReduceSum(Zeros({c.rank() == 1 ? 5 : 4}, DType::kFloat32, device));
    // Rank 0 calls Barrier while the others all-reduce.
    kinds[c.rank()] = c.rank() == 0
                          ? c.Barrier()
                          : c.AllReduceSum(Zeros({4}, DType::kFloat32, device));
    // The group is still usable.
    after[c.rank()] = c.Barrier();
    return absl::OkStatus();
  });
  ASSERT_TRUE(status.ok()) << status;
  for (int r = 0; r < k; ++r) {
    EXPECT_STATUS(shapes[r], absl::StatusCode::kInvalidArgument,
                  "the tensors differ across ranks: rank 0 [4] float32, "
                  "rank 1 [5] float32");
    EXPECT_STATUS(kinds[r], absl::StatusCode::kInvalidArgument,
                  "the ranks called different collectives: rank 0 Barrier, "
                  "rank 1 AllReduceSum");
    EXPECT_TRUE(after[r].ok()) << after[r];
  }
}

TEST_F(NcclMultiGpuTest, ReceiveThatExpectsAnotherTagOrShapeIsAnError) {
  for (const int64_t sent : {4, 8}) {  // same bytes, then more bytes
    absl::Status received;
    const absl::Status status = RunNcclRanks(
        2,
        [&](Communicator& c) {
          const Device device = Device::Cuda(c.rank());
          if (c.rank() == 0) {
            auto send = c.Send(Ones({sent}, DType::kFloat32, device), 1, 0);
            LC_RETURN_IF_ERROR(send.status());
            (*send)->Wait().IgnoreError();  // may time out: rank 1 aborts
            return absl::OkStatus();
          }
          auto recv = c.Recv(Zeros({4}, DType::kFloat32, device), 0, 1);
          LC_RETURN_IF_ERROR(recv.status());
          received = (*recv)->Wait();
          return absl::OkStatus();
        },
        milliseconds(3000));
    EXPECT_TRUE(status.ok()) << status;
    EXPECT_STATUS(received, absl::StatusCode::kInvalidArgument,
                  absl::StrCat("Recv on rank 1 from rank 0 (tag 1): rank 0 ",
                               "sent [", sent, "] float32 with tag 0 but this ",
                               "receive expects [4] float32 with tag 1"));
  }
}

TEST_F(NcclMultiGpuTest, FailingRankAbortsTheOthersAtOnce) {
  const Clock::time_point start = Clock::now();
  const absl::Status status = RunNcclRanks(Ranks(), [](Communicator& c) {
    if (c.rank() == 1) return absl::DataLossError("rank 1 lost its shard");
    // Everyone else waits for a message rank 1 never sends.
    auto recv = c.Recv(Zeros({4}, DType::kFloat32, Device::Cuda(c.rank())), 1);
    LC_RETURN_IF_ERROR(recv.status());
    return (*recv)->Wait();
  });
  EXPECT_STATUS(status, absl::StatusCode::kDataLoss,
                "rank 1: rank 1 lost its shard");
  EXPECT_LT(SecondsSince(start), 30.0);  // far below the 60 s timeout
}

// One process per rank: this binary, re-executed (a forked child of a process
// that has initialized CUDA cannot use CUDA itself) with the launcher's
// variables; each child runs NcclChildProcessTest below.
TEST_F(NcclMultiGpuTest, OneProcessPerRankThroughTheEnvironment) {
  constexpr int kRanks = 2;
  // A free port: bound once, then released.
  const int probe = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t length = sizeof(addr);
  getsockname(probe, reinterpret_cast<sockaddr*>(&addr), &length);
  close(probe);
  const std::string port = std::to_string(ntohs(addr.sin_port));

  std::vector<pid_t> children;
  for (int rank = 0; rank < kRanks; ++rank) {
    // Everything the child needs is built before fork().
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry = *e;
      bool ours = false;
      for (const char* name : {"RANK=", "WORLD_SIZE=", "MASTER_ADDR=",
                               "MASTER_PORT=", "LOCAL_RANK="}) {
        ours = ours || absl::StartsWith(entry, name);
      }
      if (!ours) env_strings.push_back(entry);
    }
    env_strings.push_back(absl::StrCat("RANK=", rank));
    env_strings.push_back(absl::StrCat("LOCAL_RANK=", rank));
    env_strings.push_back(absl::StrCat("WORLD_SIZE=", kRanks));
    env_strings.push_back("MASTER_ADDR=127.0.0.1");
    env_strings.push_back("MASTER_PORT=" + port);
    env_strings.push_back(absl::StrCat(kChildVariable, "=1"));
    std::vector<char*> envp;
    for (std::string& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string filter = "--gtest_filter=NcclChildProcessTest.*";
    char self[] = "/proc/self/exe";
    char* argv[] = {self, filter.data(), nullptr};
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      execve(self, argv, envp.data());
      _exit(127);
    }
    children.push_back(pid);
  }
  // Bounded wait: the children's own timeout is 60 s per phase.
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(180);
  std::vector<int> statuses(kRanks, -1);
  int running = kRanks;
  while (running > 0 && Clock::now() < deadline) {
    for (int rank = 0; rank < kRanks; ++rank) {
      if (statuses[rank] != -1) continue;
      int status = 0;
      if (waitpid(children[rank], &status, WNOHANG) == children[rank]) {
        statuses[rank] = status;
        --running;
      }
    }
    std::this_thread::sleep_for(milliseconds(50));
  }
  for (int rank = 0; rank < kRanks; ++rank) {
    if (statuses[rank] != -1) continue;
    kill(children[rank], SIGKILL);
    waitpid(children[rank], nullptr, 0);
    ADD_FAILURE() << "rank " << rank << " did not finish within 180 s";
  }
  for (int rank = 0; rank < kRanks; ++rank) {
    if (statuses[rank] == -1) continue;
    EXPECT_TRUE(WIFEXITED(statuses[rank]) && WEXITSTATUS(statuses[rank]) == 0)
        << "rank " << rank << " exited with status " << statuses[rank];
  }
}

TEST(NcclChildProcessTest, JoinsThroughTheEnvironment) {
  if (std::getenv(kChildVariable) == nullptr) {
    GTEST_SKIP() << "runs only as a child of "
                    "OneProcessPerRankThroughTheEnvironment";
  }
  auto c = CreateNcclCommunicatorFromEnv(kTimeout);
  ASSERT_TRUE(c.ok()) << c.status();
  const int rank = (*c)->rank();
  const Tensor t = Full({1000}, rank + 1, DType::kFloat32, Device::Cuda(rank));
  ASSERT_TRUE((*c)->AllReduceSum(t).ok());
  EXPECT_EQ(t.at({999}), 3);
  const absl::Status ring = RingExchange(**c, int64_t{1} << 22);
  EXPECT_TRUE(ring.ok()) << ring;
  EXPECT_TRUE((*c)->Barrier().ok());
}

}  // namespace
}  // namespace lc
