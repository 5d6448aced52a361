// GPU checks of the distributed runtime and ring attention on CUDA tensors:
// the threads backend moving CUDA tensors (values in every dtype, ordering
// against compute on the sender's and the receiver's streams, mixed CPU/CUDA
// errors, two devices when present), its collectives (bit-identical to the
// CPU group's), the sequence-parallel helpers, and ring attention with k = 1,
// 2 and 4 thread ranks on one GPU against single-rank CUDA Attention: out,
// lse and the gradients of q, k and v, every row of every rank, for dense,
// dilated (head groups and all heads; segments shorter than, equal to and
// spanning the chunks), block-sparse and dropout patterns, causal and not,
// contiguous and zigzag chunks, float32 and bfloat16; the bytes the ring sends
// against the CPU ring's; bad input; a rank that fails mid-ring.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

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
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/shape_ops.h"
#include "tests/attention/pattern_builders.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/distributed/rank_test_util.h"
#include "tests/distributed/ring_test_util.h"

namespace lc {
namespace {

using testing::EachRankStatus;
using testing::RecvAndWait;
using testing::SendAndWait;
using testing::Timeout;

using Clock = std::chrono::steady_clock;

const Device kGpu = Device::Cuda(0);

// The values of a tensor on the host, in float64.
std::vector<double> Host(const Tensor& t) {
  return t.to(Device::Cpu()).ToVector();
}

// The bytes of a tensor, copied to the host.
std::vector<uint8_t> HostBytes(const Tensor& t) {
  const Tensor host = t.to(Device::Cpu()).contiguous();
  const auto* p = static_cast<const uint8_t*>(host.raw_data());
  return std::vector<uint8_t>(p, p + host.numel() * DTypeSize(host.dtype()));
}

// Keeps the current stream of `device` busy for a few milliseconds (a
// float32 GEMM of 3072^3), so that work queued after it runs late: a copy
// that did not wait for it would read or write too early.
void Busy(Device device) {
  const Tensor a = Full({3072, 3072}, 1.0 / 3072, DType::kFloat32, device);
  Matmul(a, a);
}

// Values i % 251 - 125 of `shape` in `dtype` on `device` (exact in every
// dtype), shifted by `shift`.
Tensor Pattern(const Shape& shape, DType dtype, Device device,
               double shift = 0) {
  std::vector<double> values(NumElements(shape));
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = static_cast<double>(i % 251) - 125 + shift;
  }
  if (dtype == DType::kUInt8) {
    for (double& v : values) v = std::abs(v);
  }
  return FromVector(values, shape, dtype).to(device);
}

class RingCudaTest : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    // The CUDA context exists before any timing.
    SynchronizeCudaStream(0);
  }
};

// ---- The threads backend on CUDA tensors ----

TEST_F(RingCudaTest, SendRecvMovesEveryDtype) {
  const std::vector<DType> dtypes = {DType::kFloat32, DType::kFloat64,
                                     DType::kBFloat16, DType::kInt64,
                                     DType::kUInt8};
  const Shape shape = {3, 1001};
  std::vector<Tensor> received(dtypes.size());
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& comm) -> absl::Status {
        for (size_t i = 0; i < dtypes.size(); ++i) {
          const int tag = static_cast<int>(i);
          if (comm.rank() == 0) {
            LC_RETURN_IF_ERROR(
                SendAndWait(comm, Pattern(shape, dtypes[i], kGpu), 1, tag));
          } else {
            received[i] = Zeros(shape, dtypes[i], kGpu);
            LC_RETURN_IF_ERROR(RecvAndWait(comm, received[i], 0, tag));
          }
        }
        return absl::OkStatus();
      });
  for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    EXPECT_EQ(HostBytes(received[i]),
              HostBytes(Pattern(shape, dtypes[i], kGpu)))
        << DTypeName(dtypes[i]);
  }
}

TEST_F(RingCudaTest, LargeTransfersAroundARingOfFour) {
  const int k = 4;
  const Shape shape = {int64_t{1} << 22};  // 16 MiB of float32
  std::vector<Tensor> received(k);
  const std::vector<absl::Status> statuses =
      EachRankStatus(k, [&](Communicator& comm) -> absl::Status {
        const int r = comm.rank();
        const Tensor mine = Pattern(shape, DType::kFloat32, kGpu, r);
        received[r] = Empty(shape, DType::kFloat32, kGpu);
        LC_ASSIGN_OR_RETURN(auto send, comm.Send(mine, (r + 1) % k));
        LC_ASSIGN_OR_RETURN(auto recv, comm.Recv(received[r], (r + k - 1) % k));
        LC_RETURN_IF_ERROR(recv->Wait());
        return send->Wait();
      });
  for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
  for (int r = 0; r < k; ++r) {
    EXPECT_EQ(Host(received[r]),
              Host(Pattern(shape, DType::kFloat32, kGpu, (r + k - 1) % k)))
        << "rank " << r;
  }
}

// The copy waits for the kernels queued on the sender's stream before the
// Send (a kernel writes the tensor right before it), later kernels on the
// sender's stream (overwriting the tensor right after Wait) wait for the
// copy, and so do the receiver's reads after its Wait. A receive into a
// buffer that a queued kernel still reads waits for that kernel.
TEST_F(RingCudaTest, TransfersAreOrderedWithComputeOnBothStreams) {
  const Shape shape = {1 << 20};
  const Tensor expected = Pattern(shape, DType::kFloat32, kGpu, 0.5);
  Tensor got_by_receiver, read_before_receive;
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& comm) -> absl::Status {
        if (comm.rank() == 0) {
          const Tensor x = Zeros(shape, DType::kFloat32, kGpu);
          Busy(kGpu);
          CopyInto(x, expected);  // queued after the busy GEMM
          LC_RETURN_IF_ERROR(SendAndWait(comm, x, 1));
          // Overwritten right after Wait: the receiver must not see it.
          CopyInto(x, Zeros(shape, DType::kFloat32, kGpu));
          return absl::OkStatus();
        }
        const Tensor buffer = Full(shape, 7, DType::kFloat32, kGpu);
        Busy(kGpu);
        // Reads the buffer after the busy GEMM, before the receive.
        read_before_receive = buffer.clone();
        LC_RETURN_IF_ERROR(RecvAndWait(comm, buffer, 0));
        got_by_receiver = buffer.clone();
        return absl::OkStatus();
      });
  for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(Host(got_by_receiver), Host(expected));
  const std::vector<double> before = Host(read_before_receive);
  EXPECT_TRUE(std::all_of(before.begin(), before.end(),
                          [](double v) { return v == 7; }));
}

TEST_F(RingCudaTest, CpuTensorMatchedWithCudaTensorFailsBothSides) {
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& comm) -> absl::Status {
        if (comm.rank() == 0) {
          return SendAndWait(comm, Zeros({4}, DType::kFloat32, kGpu), 1);
        }
        return RecvAndWait(comm, Zeros({4}, DType::kFloat32), 0);
      });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(s.message(),
                                  "the sent tensor is on cuda:0 but the "
                                  "receive tensor on cpu"))
        << s;
  }
}

TEST_F(RingCudaTest, SendsBetweenTwoDevices) {
  if (CudaDeviceCount() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  const Shape shape = {5, 777};
  Tensor received;
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& comm) -> absl::Status {
        const Device mine = Device::Cuda(comm.rank());
        if (comm.rank() == 0) {
          const Tensor x = Zeros(shape, DType::kFloat32, mine);
          Busy(mine);
          CopyInto(x, Pattern(shape, DType::kFloat32, mine));
          return SendAndWait(comm, x, 1);
        }
        received = Zeros(shape, DType::kFloat32, mine);
        LC_RETURN_IF_ERROR(RecvAndWait(comm, received, 0));
        received = received.clone();
        return absl::OkStatus();
      });
  for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(Host(received), Host(Pattern(shape, DType::kFloat32, kGpu)));
}

// ---- Collectives ----

// Rank r's input of a collective test: fresh values in `dtype`.
Tensor RankInput(const Shape& shape, DType dtype, int rank, Device device) {
  if (dtype == DType::kInt64) {
    return Pattern(shape, dtype, device, 1000 * rank);
  }
  return RandomNormal(shape, dtype, device, SeedOfCase("rank input") + rank);
}

// On k CUDA ranks and on k CPU ranks: every rank's AllReduceSum result is
// bit-identical to the CPU group's, which adds in rank order in float64. Each
// CUDA rank writes its input with a kernel queued after a busy GEMM, so a
// reduction that did not wait for it would read zeros.
TEST_F(RingCudaTest, AllReduceSumIsBitIdenticalToTheCpuGroup) {
  const Shape shape = {3, 70001};
  for (int k : {2, 4}) {
    for (DType dtype :
         {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kInt64}) {
      SCOPED_TRACE(absl::StrCat("k = ", k, ", ", DTypeName(dtype)));
      std::vector<Tensor> cuda(k), cpu(k);
      const auto run = [&](Device device, std::vector<Tensor>* out) {
        return EachRankStatus(
            k, [&, device](Communicator& comm) -> absl::Status {
              const int r = comm.rank();
              const Tensor input = RankInput(shape, dtype, r, device);
              const Tensor x = Zeros(shape, dtype, device);
              if (device.is_cuda()) Busy(device);
              CopyInto(x, input);
              LC_RETURN_IF_ERROR(comm.AllReduceSum(x));
              (*out)[r] = x;
              return absl::OkStatus();
            });
      };
      for (const absl::Status& s : run(kGpu, &cuda)) ASSERT_TRUE(s.ok()) << s;
      for (const absl::Status& s : run(Device::Cpu(), &cpu)) {
        ASSERT_TRUE(s.ok()) << s;
      }
      for (int r = 0; r < k; ++r) {
        EXPECT_EQ(HostBytes(cuda[r]), HostBytes(cpu[0])) << "rank " << r;
      }
    }
  }
}

TEST_F(RingCudaTest, AllGatherAndBroadcastOnCuda) {
  const int k = 3;
  const Shape shape = {2, 333};
  std::vector<Tensor> gathered(k), broadcast(k);
  const std::vector<absl::Status> statuses =
      EachRankStatus(k, [&](Communicator& comm) -> absl::Status {
        const int r = comm.rank();
        const Tensor input = Zeros(shape, DType::kInt64, kGpu);
        Busy(kGpu);
        CopyInto(input, Pattern(shape, DType::kInt64, kGpu, r));
        gathered[r] = Zeros({k, 2, 333}, DType::kInt64, kGpu);
        LC_RETURN_IF_ERROR(comm.AllGather(input, gathered[r]));
        broadcast[r] = Pattern(shape, DType::kBFloat16, kGpu, 10 * r);
        return comm.Broadcast(broadcast[r], /*root=*/1);
      });
  for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
  std::vector<Tensor> parts;
  for (int r = 0; r < k; ++r) {
    parts.push_back(Pattern(shape, DType::kInt64, kGpu, r).unsqueeze(0));
  }
  const std::vector<double> want_gathered = Host(Concat(parts, 0));
  const std::vector<double> want_broadcast =
      Host(Pattern(shape, DType::kBFloat16, kGpu, 10));
  for (int r = 0; r < k; ++r) {
    EXPECT_EQ(Host(gathered[r]), want_gathered) << "rank " << r;
    EXPECT_EQ(Host(broadcast[r]), want_broadcast) << "rank " << r;
  }
}

TEST_F(RingCudaTest, CollectiveOfCpuAndCudaTensorsFailsOnEveryRank) {
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& comm) -> absl::Status {
        const Device device = comm.rank() == 0 ? kGpu : Device::Cpu();
        return comm.AllReduceSum(Zeros({4}, DType::kFloat32, device));
      });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(
        s.message(),
        "the tensors lie on different kinds of devices: rank 0 "
        "cuda:0, rank 1 cpu"))
        << s;
  }
}

TEST_F(RingCudaTest, AllReduceSumAcrossTwoDevices) {
  if (CudaDeviceCount() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  const Shape shape = {1000};
  std::vector<Tensor> sums(2);
  const std::vector<absl::Status> statuses =
      EachRankStatus(2, [&](Communicator& comm) -> absl::Status {
        const int r = comm.rank();
        sums[r] = RankInput(shape, DType::kFloat32, r, Device::Cuda(r));
        return comm.AllReduceSum(sums[r]);
      });
  for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
  // The float64 sum of the float32 inputs, rounded once.
  const Tensor want = Add(RankInput(shape, DType::kFloat32, 0, Device::Cpu())
                              .to(DType::kFloat64),
                          RankInput(shape, DType::kFloat32, 1, Device::Cpu())
                              .to(DType::kFloat64))
                          .to(DType::kFloat32);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(sums[r].device(), Device::Cuda(r));
    EXPECT_EQ(HostBytes(sums[r]), HostBytes(want)) << "rank " << r;
  }
}

// ---- Sequence-parallel helpers ----

TEST_F(RingCudaTest, SplitGatherAndGradientAllReduceOnCuda) {
  const int k = 3;
  const int64_t n = 29;
  const Tensor x =
      RandomNormal({2, n, 3, 5}, DType::kFloat32, kGpu, SeedOfCase("split"));
  for (SequenceLayout layout :
       {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
    SCOPED_TRACE(SequenceLayoutName(layout));
    std::vector<Tensor> gathered(k);
    const std::vector<absl::Status> statuses =
        EachRankStatus(k, [&](Communicator& comm) -> absl::Status {
          const Tensor local = SplitSequence(x, k, comm.rank(), layout);
          EXPECT_EQ(local.device(), kGpu);
          EXPECT_EQ(Host(local), Host(SplitSequence(x.to(Device::Cpu()), k,
                                                    comm.rank(), layout)));
          LC_ASSIGN_OR_RETURN(gathered[comm.rank()],
                              GatherSequence(comm, local, n, layout));
          return absl::OkStatus();
        });
    for (const absl::Status& s : statuses) ASSERT_TRUE(s.ok()) << s;
    for (int r = 0; r < k; ++r) EXPECT_EQ(Host(gathered[r]), Host(x));
  }

  // Gradients: a small one (packed), a large one (reduced in place), one
  // missing on rank 1 (zeros); the sums equal the CPU group's bit for bit.
  const std::vector<Shape> shapes = {{7, 3}, {200, 100}, {11}};
  const auto run = [&](Device device) {
    std::vector<std::vector<Tensor>> grads(k);
    const std::vector<absl::Status> statuses =
        EachRankStatus(k, [&](Communicator& comm) -> absl::Status {
          const int r = comm.rank();
          std::vector<Tensor> params;
          for (size_t i = 0; i < shapes.size(); ++i) {
            params.push_back(Zeros(shapes[i], DType::kFloat32, device));
            if (!(r == 1 && i == 2)) {
              params.back().set_grad(RankInput(shapes[i], DType::kFloat32,
                                               r * 10 + static_cast<int>(i),
                                               device));
            }
          }
          LC_RETURN_IF_ERROR(AllReduceGradients(comm, params));
          for (const Tensor& p : params) grads[r].push_back(p.grad());
          return absl::OkStatus();
        });
    for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
    return grads;
  };
  const auto cuda = run(kGpu), cpu = run(Device::Cpu());
  for (int r = 0; r < k; ++r) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      ASSERT_TRUE(cuda[r][i].defined());
      EXPECT_EQ(cuda[r][i].device(), kGpu);
      EXPECT_EQ(HostBytes(cuda[r][i]), HostBytes(cpu[0][i]))
          << "rank " << r << ", parameter " << i;
    }
  }
}

// ---- Ring attention against single-rank attention ----

// One problem: shapes, pattern and options.
struct RingCase {
  std::string name;
  int64_t batch = 2, n = 192, heads = 4, head_dim = 64;
  AttentionPattern pattern;
  AttentionOptions options;
  uint64_t dropout_seed = 0;
};

RingCase MakeRingCase(std::string name, int64_t n, AttentionPattern pattern) {
  RingCase c;
  c.name = std::move(name);
  c.n = n;
  c.pattern = std::move(pattern);
  return c;
}

// The dilated cases for k ranks over n tokens: segments shorter than the
// chunks, as long as a contiguous chunk (and twice), and spanning several
// chunks, with head groups and all heads.
std::vector<RingCase> DilatedCases(int64_t n, int k, HeadLayout layout) {
  const int64_t chunk = n / k;
  const std::string name =
      layout == HeadLayout::kHeadGroups ? "head groups" : "all heads";
  return {
      MakeRingCase(
          name + ", segments 16,32 rates 1,2", n,
          testing::DilatedHeads(DilatedOptions{{16, 32}, {1, 2}, layout}, 4)),
      MakeRingCase(absl::StrCat(name, ", segments ", chunk, ",", 2 * chunk,
                                " rates 1,2"),
                   n,
                   testing::DilatedHeads(
                       DilatedOptions{{chunk, 2 * chunk}, {1, 2}, layout}, 4)),
      MakeRingCase(
          name + ", segments 64,n rates 2,4", n,
          testing::DilatedHeads(DilatedOptions{{64, n}, {2, 4}, layout}, 4)),
  };
}

std::vector<RingCase> BlockSparseCases(int64_t n) {
  BlockSparseOptions local;
  local.pattern = SparsePattern::kLocalWindow;
  local.block_size = 16;
  local.window = 32;
  BlockSparseOptions global;
  global.pattern = SparsePattern::kGlobalLocal;
  global.block_size = 16;
  global.window = 16;
  global.global_tokens = 16;
  return {
      MakeRingCase("local window", n, testing::BlockSparseHeads(local, 4, n)),
      MakeRingCase("global local", n, testing::BlockSparseHeads(global, 4, n))};
}

// The whole-sequence inputs and the gradients fed back into out and lse.
struct Inputs {
  Tensor q, k, v, grad_out, grad_lse;
};

Inputs RandomInputs(const RingCase& c, DType dtype, const std::string& what) {
  const Shape shape = {c.batch, c.n, c.heads, c.head_dim};
  const uint64_t seed = SeedOfCase(what);
  Inputs in{
      RandomNormal(shape, dtype, kGpu, seed),
      RandomNormal(shape, dtype, kGpu, seed + 1),
      RandomNormal(shape, dtype, kGpu, seed + 2),
      RandomNormal(shape, dtype, kGpu, seed + 3),
      // lse is float32 for float32 and bfloat16 inputs.
      RandomNormal({c.batch, c.heads, c.n}, DType::kFloat32, kGpu, seed + 4)};
  return in;
}

struct Results {
  Tensor out, lse, dq, dk, dv;
};

Results SingleRank(const RingCase& c, const Inputs& in) {
  Tensors leaves = {in.q.detach(), in.k.detach(), in.v.detach()};
  for (Tensor& t : leaves) t.set_requires_grad(true);
  Generator gen(c.dropout_seed);
  AttentionCallOptions call;
  call.generator = &gen;
  AttentionResult r =
      Attention(leaves[0], leaves[1], leaves[2], c.pattern, c.options, call);
  Backward({r.out, r.lse}, {in.grad_out, in.grad_lse});
  return {r.out.detach(), r.lse.detach(), leaves[0].grad(), leaves[1].grad(),
          leaves[2].grad()};
}

struct RingRun {
  absl::Status status;
  std::vector<Results> ranks;
  std::vector<RingStats> forward, total;  // per rank
};

// Runs RingAttention forward and backward on k thread ranks (each on its
// own stream of the inputs' device, or the CPU), each on its SplitSequence
// rows of `in` (passed through `prepare`, e.g. to make them strided).
RingRun RunRing(const RingCase& c, const Inputs& in, int k,
                SequenceLayout layout,
                const std::function<Tensor(const Tensor&)>& prepare = nullptr) {
  RingRun run;
  run.ranks.resize(k);
  run.forward.resize(k);
  run.total.resize(k);
  run.status = RunRanks(
      k,
      [&](Communicator& comm) {
        const int r = comm.rank();
        Tensors local;
        for (const Tensor* t : {&in.q, &in.k, &in.v}) {
          Tensor x = SplitSequence(*t, k, r, layout).detach();
          if (prepare) x = prepare(x);
          x.set_requires_grad(true);
          local.push_back(x);
        }
        Generator gen(c.dropout_seed);
        AttentionCallOptions call;
        call.generator = &gen;
        RingOptions ring;
        ring.layout = layout;
        ring.stats = &run.total[r];
        AttentionResult res =
            RingAttention(comm, local[0], local[1], local[2], c.n, c.pattern,
                          c.options, ring, call);
        run.forward[r] = run.total[r];
        Backward({res.out, res.lse},
                 {SplitSequence(in.grad_out, k, r, layout),
                  testing::SplitStat(in.grad_lse, k, r, layout)});
        run.ranks[r] = {res.out.detach(), res.lse.detach(), local[0].grad(),
                        local[1].grad(), local[2].grad()};
        return absl::OkStatus();
      },
      Timeout(60000));
  return run;
}

// The ring's results gathered from every rank equal single-rank CUDA
// Attention within `tol` (relative, in norm).
void ExpectRingMatches(const RingRun& run, const Results& want, int64_t n,
                       SequenceLayout layout, double tol) {
  ASSERT_TRUE(run.status.ok()) << run.status;
  const auto gather = [&](Tensor Results::*field) {
    std::vector<Tensor> parts;
    for (const Results& r : run.ranks) parts.push_back(r.*field);
    return testing::GatherRows(parts, n, layout);
  };
  std::vector<Tensor> lse_parts;
  for (const Results& r : run.ranks) lse_parts.push_back(r.lse.transpose(1, 2));
  const Tensor lse = testing::GatherRows(lse_parts, n, layout).transpose(1, 2);
  for (const Results& r : run.ranks) {
    EXPECT_EQ(r.out.device(), kGpu);
    EXPECT_EQ(r.out.dtype(), want.out.dtype());
    EXPECT_EQ(r.lse.dtype(), want.lse.dtype());
    EXPECT_EQ(r.dk.dtype(), want.dk.dtype());
  }
  ExpectCudaClose(gather(&Results::out), want.out, tol, "out");
  ExpectCudaClose(lse, want.lse, tol, "lse");
  ExpectCudaClose(gather(&Results::dq), want.dq, tol, "grad q");
  ExpectCudaClose(gather(&Results::dk), want.dk, tol, "grad k");
  ExpectCudaClose(gather(&Results::dv), want.dv, tol, "grad v");
}

// Every rank sends what the CPU ring (float32, same problem) sends: the same
// tensors and, for float32, the same bytes; for bfloat16 K and V travel in
// bfloat16 (half the CPU's float32 bytes) and dK/dV in float32.
void ExpectBytesOfTheCpuRing(const RingCase& c, const Inputs& in,
                             const RingRun& run, int k, SequenceLayout layout,
                             DType dtype) {
  const auto to_cpu = [](const Tensor& t) {
    return t.to(Device::Cpu()).to(DType::kFloat32);
  };
  const Inputs host{to_cpu(in.q), to_cpu(in.k), to_cpu(in.v),
                    to_cpu(in.grad_out), to_cpu(in.grad_lse)};
  const RingRun cpu = RunRing(c, host, k, layout);
  ASSERT_TRUE(cpu.status.ok()) << cpu.status;
  for (int r = 0; r < k; ++r) {
    SCOPED_TRACE(absl::StrCat("bytes of rank ", r));
    EXPECT_EQ(run.total[r].transfers, cpu.total[r].transfers);
    EXPECT_EQ(run.total[r].steps_computed, cpu.total[r].steps_computed);
    EXPECT_EQ(run.total[r].steps_skipped, cpu.total[r].steps_skipped);
    const int64_t cpu_forward = cpu.forward[r].bytes_sent;
    if (dtype == DType::kFloat32) {
      EXPECT_EQ(run.forward[r].bytes_sent, cpu_forward);
      EXPECT_EQ(run.total[r].bytes_sent, cpu.total[r].bytes_sent);
    } else {
      // Backward sends K/V as forward does, plus the float32 dK/dV.
      EXPECT_EQ(2 * run.forward[r].bytes_sent, cpu_forward);
      EXPECT_EQ(run.total[r].bytes_sent, cpu.total[r].bytes_sent - cpu_forward);
    }
  }
}

// Every case for k in {1, 2, 4}, both layouts, causal and not, float32
// (tolerance 1e-5) and bfloat16 (2e-2): the ring against single-rank CUDA
// Attention on the same inputs, and its bytes against the CPU ring's.
void CheckRingCases(
    const std::function<std::vector<RingCase>(int k)>& cases_for) {
  for (int k : {1, 2, 4}) {
    for (const RingCase& base : cases_for(k)) {
      for (bool causal : {false, true}) {
        for (SequenceLayout layout :
             {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
          for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
            RingCase c = base;
            c.options.causal = causal;
            const std::string what = absl::StrCat(
                c.name, ", n = ", c.n, ", k = ", k, causal ? ", causal" : "",
                ", ", SequenceLayoutName(layout), ", ", DTypeName(dtype));
            SCOPED_TRACE(what);
            const Inputs in = RandomInputs(c, dtype, what);
            const Results want = SingleRank(c, in);
            SynchronizeCudaStream(0);  // the ranks' streams read the inputs
            const RingRun run = RunRing(c, in, k, layout);
            ExpectRingMatches(run, want, c.n, layout,
                              CudaRelativeTolerance(dtype));
            if (::testing::Test::HasFatalFailure()) return;
            ExpectBytesOfTheCpuRing(c, in, run, k, layout, dtype);
          }
        }
      }
    }
  }
}

TEST_F(RingCudaTest, DenseMatchesSingleRank) {
  CheckRingCases([](int) {
    return std::vector<RingCase>{
        MakeRingCase("dense", 192, testing::DenseHeads(4, 192)),
        MakeRingCase("dense", 203, testing::DenseHeads(4, 203))};
  });
}

TEST_F(RingCudaTest, DilatedHeadGroupsMatchSingleRank) {
  CheckRingCases(
      [](int k) { return DilatedCases(192, k, HeadLayout::kHeadGroups); });
}

TEST_F(RingCudaTest, DilatedAllHeadsMatchSingleRank) {
  CheckRingCases(
      [](int k) { return DilatedCases(192, k, HeadLayout::kAllHeads); });
}

TEST_F(RingCudaTest, BlockSparseMatchesSingleRank) {
  CheckRingCases([](int) { return BlockSparseCases(192); });
}

// Dropout draws the same Philox stream per global (query, key) pair on
// every rank and on one rank.
TEST_F(RingCudaTest, DropoutMatchesSingleRank) {
  CheckRingCases([](int) {
    RingCase c =
        MakeRingCase("dense, dropout 0.2", 160, testing::DenseHeads(4, 160));
    c.options.dropout = 0.2;
    c.dropout_seed = 1234;
    return std::vector<RingCase>{c};
  });
}

// Strided (non-contiguous) inputs and an odd head_dim (the FMA kernels).
TEST_F(RingCudaTest, StridedInputsAndOddHeadDim) {
  RingCase c = MakeRingCase(
      "dilated, head_dim 40", 101,
      testing::DilatedHeads(
          DilatedOptions{{32, 101}, {1, 3}, HeadLayout::kAllHeads}, 4));
  c.head_dim = 40;
  c.options.causal = true;
  const Inputs in = RandomInputs(c, DType::kFloat32, c.name);
  const Results want = SingleRank(c, in);
  SynchronizeCudaStream(0);
  const auto strided = [](const Tensor& x) {
    return x.transpose(2, 3).contiguous().transpose(2, 3);
  };
  const RingRun run = RunRing(c, in, 4, SequenceLayout::kZigzag, strided);
  ExpectRingMatches(run, want, c.n, SequenceLayout::kZigzag,
                    CudaRelativeTolerance(DType::kFloat32));
}

// ---- Errors ----

TEST_F(RingCudaTest, BadInputIsAClearError) {
  const std::vector<absl::Status> statuses =
      EachRankStatus(1, [&](Communicator& comm) -> absl::Status {
        const Tensor q = Zeros({1, 8, 2, 16}, DType::kFloat32, kGpu);
        const Tensor k_cpu = Zeros({1, 8, 2, 16}, DType::kFloat32);
        const absl::Status mixed = StatusFromCall([&] {
          RingAttention(comm, q, k_cpu, q, 8, testing::DenseHeads(2, 8));
        });
        EXPECT_EQ(mixed.code(), absl::StatusCode::kInvalidArgument) << mixed;
        EXPECT_TRUE(absl::StrContains(mixed.message(),
                                      "q on cuda:0, k on cpu, v on cuda:0"))
            << mixed;
        const Tensor wide = Zeros({1, 8, 2, 300}, DType::kFloat32, kGpu);
        const absl::Status head_dim = StatusFromCall([&] {
          RingAttention(comm, wide, wide, wide, 8, testing::DenseHeads(2, 8));
        });
        EXPECT_EQ(head_dim.code(), absl::StatusCode::kInvalidArgument)
            << head_dim;
        EXPECT_TRUE(absl::StrContains(head_dim.message(), "head_dim 300"))
            << head_dim;
        return absl::OkStatus();
      });
  for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
}

// A rank whose send fails mid-ring (in forward, or in backward) or that
// throws between forward and backward: every rank returns an error, the
// failing rank its own, the others Aborted carrying it, long before the
// timeout.
TEST_F(RingCudaTest, FailingRankStopsEveryRankPromptly) {
  const int k = 4, bad = 2;
  const RingCase c =
      MakeRingCase("dense causal", 256, testing::DenseHeads(4, 256));
  const Inputs in = RandomInputs(c, DType::kBFloat16, "fault");
  SynchronizeCudaStream(0);
  struct Variant {
    const char* name;
    int fail_at;   // the failing send of rank `bad`, 0 for none
    bool between;  // rank `bad` throws between forward and backward
    const char* cause;
  };
  // Rank 2 of 4, causal contiguous: 6 forward sends (K and V of chunks 2,
  // 1, 0), then backward's K and V of chunk 2 (sends 7, 8); send 9 is
  // backward step 1's K.
  const std::vector<Variant> variants = {
      {"a forward send fails", 3, false, "injected failure of send 3"},
      {"a backward send fails", 9, false, "injected failure of send 9"},
      {"throws between forward and backward", 0, true,
       "injected failure on rank 2"},
  };
  for (const Variant& variant : variants) {
    SCOPED_TRACE(variant.name);
    std::vector<absl::Status> ranks(k);
    const Clock::time_point start = Clock::now();
    const absl::Status first = RunRanks(
        k,
        [&](Communicator& comm) {
          const int r = comm.rank();
          testing::FailingCommunicator failing(comm,
                                               r == bad ? variant.fail_at : 0);
          const absl::Status status = StatusFromCall([&] {
            Tensors local;
            for (const Tensor* t : {&in.q, &in.k, &in.v}) {
              Tensor x =
                  SplitSequence(*t, k, r, SequenceLayout::kContiguous).detach();
              x.set_requires_grad(true);
              local.push_back(x);
            }
            AttentionOptions options;
            options.causal = true;
            AttentionResult res = RingAttention(
                failing, local[0], local[1], local[2], c.n, c.pattern, options);
            if (variant.between && r == bad) {
              throw Error(absl::InternalError("injected failure on rank 2"));
            }
            res.out.backward(
                SplitSequence(in.grad_out, k, r, SequenceLayout::kContiguous));
            SynchronizeCudaStream(0);
          });
          ranks[r] = status;
          return status;
        },
        Timeout(5000));
    const double seconds =
        std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_LT(seconds, 4.0);
    EXPECT_TRUE(absl::StrContains(first.message(), variant.cause)) << first;
    for (int r = 0; r < k; ++r) {
      EXPECT_FALSE(ranks[r].ok()) << "rank " << r << " succeeded";
      EXPECT_TRUE(absl::StrContains(ranks[r].message(), variant.cause))
          << "rank " << r << ": " << ranks[r];
      if (r != bad) {
        EXPECT_EQ(ranks[r].code(), absl::StatusCode::kAborted)
            << "rank " << r << ": " << ranks[r];
      }
    }
  }
}

}  // namespace
}  // namespace lc
