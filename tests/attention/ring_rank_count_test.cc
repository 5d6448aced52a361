// Ring attention as the rank count k grows for a fixed sequence: each rank's
// memory is O(n / k + k), so a doubling of k at most doubles it once the
// k term dominates (issue 14: a plan of every rank's use of every chunk on
// every rank made it O(k^2) per rank, 23 GB for 1,000 ranks on 32 tokens),
// and results on many ranks, ranks of one token among them, still equal
// single-rank Attention.
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <memory>
#include <vector>

#include "attention/attention.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/memory.h"
#include "core/random.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "tests/attention/attention_test_util.h"
#include "tests/distributed/ring_test_util.h"
#include "tests/op_test_util.h"

#if defined(__SANITIZE_ADDRESS__)
// The sanitizer runtime's count of allocated bytes (declared in
// sanitizer/allocator_interface.h, which GCC does not ship).
extern "C" size_t __sanitizer_get_current_allocated_bytes();
#endif

namespace lc {
namespace {

constexpr int64_t kBatch = 1, kHeads = 2, kHeadDim = 8;

struct Problem {
  int64_t n = 0;
  AttentionPattern pattern;
  AttentionOptions options;
  Tensor q, k, v, grad_out;
};

// Causal dilated attention in the training config's shape: local segments
// on head 0, one dilated segment over the whole sequence on head 1, so
// every chunk travels around the whole ring.
Problem MakeProblem(int64_t n, DType dtype) {
  Problem p;
  p.n = n;
  DilatedOptions dilated;
  dilated.segment_lengths = {16, n};
  dilated.dilation_rates = {1, 4};
  p.pattern = testing::DilatedHeads(dilated, kHeads);
  p.options.causal = true;
  Generator gen = testing::TestGenerator();
  const Shape shape = {kBatch, n, kHeads, kHeadDim};
  p.q = Randn(shape, gen, dtype);
  p.k = Randn(shape, gen, dtype);
  p.v = Randn(shape, gen, dtype);
  p.grad_out = Randn(shape, gen, dtype);
  return p;
}

// Bytes the C allocator has handed out and not taken back, over all arenas
// (under AddressSanitizer, whose allocator replaces glibc's, its count).
int64_t HeapInUse() {
#if defined(__SANITIZE_ADDRESS__)
  return static_cast<int64_t>(__sanitizer_get_current_allocated_bytes());
#else
  const struct mallinfo2 info = mallinfo2();
  return static_cast<int64_t>(info.uordblks + info.hblkhd);
#endif
}

struct RankCountMemory {
  int64_t tensor_peak = 0;  // the largest rank's MemoryScope peak
  int64_t heap = 0;         // malloc'ed bytes per rank, after forward
  double seconds = 0;
};

// Forward and backward on k ranks. Every rank counts its tensors under its
// own MemoryScope; the heap (tensors and host structures such as the ring's
// plan, of every rank: the ranks wait for each other after forward, while
// all of it is alive) is sampled once by rank 0 and divided by k.
RankCountMemory Measure(const Problem& p, int k) {
  std::vector<int64_t> peaks(k, 0);
  int64_t heap = 0;
  const int64_t heap_before = HeapInUse();
  const auto start = std::chrono::steady_clock::now();
  const absl::Status status = RunRanks(k, [&](Communicator& comm) {
    const int r = comm.rank();
    Tensors local;
    for (const Tensor* t : {&p.q, &p.k, &p.v}) {
      Tensor x = SplitSequence(*t, k, r, SequenceLayout::kContiguous).detach();
      x.set_requires_grad(true);
      local.push_back(x);
    }
    const Tensor grad_out =
        SplitSequence(p.grad_out, k, r, SequenceLayout::kContiguous);
    auto tracker = std::make_shared<MemoryTracker>();
    {
      MemoryScope scope(tracker);
      AttentionResult res = RingAttention(comm, local[0], local[1], local[2],
                                          p.n, p.pattern, p.options);
      LC_RETURN_IF_ERROR(comm.Barrier());
      if (r == 0) heap = HeapInUse() - heap_before;
      LC_RETURN_IF_ERROR(comm.Barrier());
      res.out.backward(grad_out);
    }
    peaks[r] = tracker->stats().peak_bytes;
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
  RankCountMemory m;
  m.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  m.tensor_peak = *std::max_element(peaks.begin(), peaks.end());
  m.heap = heap / k;
  return m;
}

// Per-rank memory (tensors, and the whole heap) may at most double with
// each doubling of k, with 25% tolerance and kConstant bytes for what does
// not scale. n = 256: from 32 tokens per rank down to 4. The old plan
// (O(k^2) per rank) grew the heap 6.6-fold from k = 32 to 64 (measured).
TEST(RingRankCountTest, MemoryPerRankGrowsAtMostLinearly) {
  constexpr int64_t kConstant = 4 << 10;
  const Problem p = MakeProblem(256, DType::kFloat32);
  Measure(p, 8);  // warms up what the process allocates once
  std::vector<RankCountMemory> m;
  for (int k : {8, 16, 32, 64}) {
    m.push_back(Measure(p, k));
    std::cout << "[ memory   ] k=" << k << ": tensor peak per rank "
              << m.back().tensor_peak << " bytes, heap per rank "
              << m.back().heap << " bytes, " << m.back().seconds << " s\n";
  }
  for (size_t i = 1; i < m.size(); ++i) {
    const int k = 8 << i;
    EXPECT_LE(m[i].tensor_peak, 2.5 * m[i - 1].tensor_peak + kConstant)
        << "tensor peak per rank, k=" << k / 2 << " -> " << k;
    EXPECT_LE(m[i].heap, 2.5 * m[i - 1].heap + kConstant)
        << "heap per rank, k=" << k / 2 << " -> " << k;
  }
}

// 48 ranks on 100 tokens (2 or 3 tokens per rank; zigzag: 1 or 2 per
// chunk, every chunk used far along the ring by the dilated head) give
// single-rank Attention's out, lse and gradients.
TEST(RingRankCountTest, ManyRanksMatchOneRank) {
  constexpr int kRanks = 48;
  const Problem p = MakeProblem(100, DType::kFloat64);
  Tensors leaves = {p.q.detach(), p.k.detach(), p.v.detach()};
  for (Tensor& t : leaves) t.set_requires_grad(true);
  const AttentionResult single =
      Attention(leaves[0], leaves[1], leaves[2], p.pattern, p.options);
  single.out.backward(p.grad_out);
  for (SequenceLayout layout :
       {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
    SCOPED_TRACE(SequenceLayoutName(layout));
    // out, dq, dk, dv per rank.
    std::vector<std::vector<Tensor>> got(4, std::vector<Tensor>(kRanks));
    std::vector<Tensor> lse(kRanks);
    const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
      const int r = comm.rank();
      Tensors local;
      for (const Tensor* t : {&p.q, &p.k, &p.v}) {
        Tensor x = SplitSequence(*t, kRanks, r, layout).detach();
        x.set_requires_grad(true);
        local.push_back(x);
      }
      RingOptions ring;
      ring.layout = layout;
      AttentionResult res = RingAttention(comm, local[0], local[1], local[2],
                                          p.n, p.pattern, p.options, ring);
      res.out.backward(SplitSequence(p.grad_out, kRanks, r, layout));
      got[0][r] = res.out.detach();
      lse[r] = res.lse.detach().transpose(1, 2);
      for (int i = 0; i < 3; ++i) got[i + 1][r] = local[i].grad();
      return absl::OkStatus();
    });
    ASSERT_TRUE(status.ok()) << status;
    const testing::Tolerance tol = testing::DefaultTolerance(DType::kFloat64);
    testing::ExpectAllClose(testing::GatherRows(got[0], p.n, layout),
                            single.out, tol, "out");
    testing::ExpectAllClose(
        testing::GatherRows(lse, p.n, layout).transpose(1, 2).contiguous(),
        single.lse, tol, "lse");
    const char* names[] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; ++i) {
      testing::ExpectAllClose(testing::GatherRows(got[i + 1], p.n, layout),
                              leaves[i].grad(), tol, names[i]);
    }
  }
}

}  // namespace
}  // namespace lc
