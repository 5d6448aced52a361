// Ring attention's memory per rank falls as 1/k for a fixed total n: each
// rank runs its forward and backward under its own MemoryScope (a rank is a
// thread, and a scope counts the allocations of its thread), and its peak is
// compared with single-rank Attention's on the whole sequence (both exclude
// the inputs and the incoming gradient, made before the scope).
#include <algorithm>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
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
#include "tests/op_test_util.h"

namespace lc {
namespace {

struct Problem {
  int64_t batch = 1, n = 0, heads = 2, head_dim = 32;
  AttentionPattern pattern;
  AttentionOptions options;
  Tensor q, k, v, grad_out;
};

// Peak bytes that Attention's forward and backward allocate on the whole
// sequence (inputs and the incoming gradient excluded: made before the
// scope).
int64_t SingleRankPeak(const Problem& p) {
  Tensors leaves = {p.q.detach(), p.k.detach(), p.v.detach()};
  for (Tensor& t : leaves) t.set_requires_grad(true);
  auto tracker = std::make_shared<MemoryTracker>();
  {
    MemoryScope scope(tracker);
    AttentionResult r =
        Attention(leaves[0], leaves[1], leaves[2], p.pattern, p.options);
    r.out.backward(p.grad_out);
  }
  return tracker->stats().peak_bytes;
}

// Per rank, the peak bytes RingAttention's forward and backward allocate on
// k ranks (local inputs and gradients of out made before the scope).
std::vector<int64_t> RingPeaks(const Problem& p, int k, SequenceLayout layout) {
  std::vector<int64_t> peaks(k, -1);
  const absl::Status status = RunRanks(k, [&](Communicator& comm) {
    const int r = comm.rank();
    Tensors local;
    for (const Tensor* t : {&p.q, &p.k, &p.v}) {
      Tensor x = SplitSequence(*t, k, r, layout).detach();
      x.set_requires_grad(true);
      local.push_back(x);
    }
    const Tensor grad_out = SplitSequence(p.grad_out, k, r, layout);
    auto tracker = std::make_shared<MemoryTracker>();
    {
      MemoryScope scope(tracker);
      RingOptions ring;
      ring.layout = layout;
      AttentionResult res = RingAttention(comm, local[0], local[1], local[2],
                                          p.n, p.pattern, p.options, ring);
      res.out.backward(grad_out);
    }
    peaks[r] = tracker->stats().peak_bytes;
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
  return peaks;
}

// The peaks of ring attention on k = 1, 2, 4, 8 ranks, both layouts, as
// multiples of single / k; returns the worst rank's peak per k.
std::vector<int64_t> WorstPeaks(const Problem& p, int64_t single,
                                SequenceLayout layout) {
  const int64_t tensor_bytes = p.batch * p.n * p.heads * p.head_dim * 4;
  std::vector<int64_t> worst;
  for (int k : {1, 2, 4, 8}) {
    const std::vector<int64_t> peaks = RingPeaks(p, k, layout);
    int64_t w = 0;
    std::string per_rank;
    for (int64_t peak : peaks) {
      w = std::max(w, peak);
      absl::StrAppend(&per_rank, " ", double(peak) * k / tensor_bytes);
    }
    std::cout << "[ memory   ] " << SequenceLayoutName(layout) << " k=" << k
              << ": worst rank " << double(w) * k / single
              << " x single / k; per rank, in chunks:" << per_rank << "\n";
    worst.push_back(w);
  }
  return worst;
}

Problem MakeProblem(int64_t batch, int64_t n, AttentionPattern pattern) {
  Problem p;
  p.batch = batch;
  p.n = n;
  p.pattern = std::move(pattern);
  p.options.causal = true;  // as in a language model
  Generator gen = testing::TestGenerator();
  const Shape shape = {p.batch, p.n, p.heads, p.head_dim};
  p.q = Randn(shape, gen);
  p.k = Randn(shape, gen);
  p.v = Randn(shape, gen);
  p.grad_out = Randn(shape, gen);
  return p;
}

// kConstant = 64 KiB covers allocations that do not scale with n / k; it is
// 1/4 of the smallest chunk tensor here (k = 8: 256 KiB), so it hides
// nothing that grows with the chunk. N (one [batch, n, heads, head_dim]
// float32 tensor) is 2 MiB in both tests; each takes about a second.
constexpr int64_t kConstant = 64 << 10;

// The bound, per-rank peak <= single-rank peak / k * 1.25 + a small
// constant for k = 1, 2, 4, 8, for dilated attention (the shape of the
// training config: local segments of 256 tokens on head 0; one segment over
// the whole sequence at dilation 16 on head 1, so every rank needs every
// other rank's chunk and the ring runs all k - 1 steps). Only the keys a
// rank uses travel (1 row in 16 of head 1) and the ring computes on them
// where they arrive, so its buffers are 1/32 of a chunk each: the peak is
// the single rank's made of chunks (out, dq, dk, dv, one more tensor of the
// autograd engine: 5.03 N / k), and it halves with every doubling of k.
TEST(RingMemoryTest, DilatedPeakPerRankIsSingleRankOverK) {
  DilatedOptions dilated;
  dilated.segment_lengths = {256, 8192};
  dilated.dilation_rates = {1, 16};
  const Problem p = MakeProblem(1, 8192, testing::DilatedHeads(dilated, 2));
  const int64_t single = SingleRankPeak(p);
  std::cout << "[ memory   ] dilated, single rank: peak " << single
            << " bytes\n";
  for (SequenceLayout layout :
       {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
    const std::vector<int64_t> worst = WorstPeaks(p, single, layout);
    for (size_t i = 0; i < worst.size(); ++i) {
      const int k = 1 << i;
      EXPECT_LE(worst[i], 1.25 * single / k + kConstant)
          << SequenceLayoutName(layout) << " k=" << k;
      // And it halves with every doubling of k.
      if (k >= 2) {
        EXPECT_LE(worst[i], worst[i - 1] / 2 * 1.25 + kConstant)
            << SequenceLayoutName(layout) << " k=" << k / 2 << " -> " << k;
      }
    }
  }
}

// Dense attention needs whole chunks from every rank, and a ring that
// overlaps transfer and compute holds, besides the single rank's 5 chunk
// tensors (out, dq, dk, dv, the engine's), the K, V, dK and dV it computes
// on and the ones arriving (8 chunks): the 1.25 x single / k cannot
// hold for any double-buffered ring (13 / 5 = 2.6 at the least; measured
// 14 chunks, 2.8, with the dK/dV that come home). Asserted instead: the
// peak stays within kRingFactor x single / k for k = 1, 2, 4, 8, and falls
// as 1/k from k = 4 to 8 (peak(8) <= peak(4) / 2 * 1.25 + kConstant), where
// both rings run every buffer. From 2 to 4 it cannot halve: with k = 2
// every chunk makes one hop, so dK/dV never travel on (up to 9 chunks per
// rank),
// from k = 4 they do (14). Batch 8 of 1024 tokens.
TEST(RingMemoryTest, DensePeakPerRankFallsAsOneOverK) {
  constexpr double kRingFactor = 3.0;
  const Problem p = MakeProblem(8, 1024, testing::DenseHeads(2, 1024));
  const int64_t single = SingleRankPeak(p);
  std::cout << "[ memory   ] dense, single rank: peak " << single << " bytes\n";
  for (SequenceLayout layout :
       {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
    const std::vector<int64_t> worst = WorstPeaks(p, single, layout);
    for (size_t i = 0; i < worst.size(); ++i) {
      const int k = 1 << i;
      EXPECT_LE(worst[i], kRingFactor * single / k + kConstant)
          << SequenceLayoutName(layout) << " k=" << k;
    }
    EXPECT_LE(worst[3], worst[2] / 2 * 1.25 + kConstant)
        << SequenceLayoutName(layout) << " k=4 -> 8";
  }
}

}  // namespace
}  // namespace lc
