// Ring attention's memory per rank falls as 1/k for a fixed total n: each
// rank runs its forward and backward under its own MemoryScope (a rank is a
// thread, and a scope counts the allocations of its thread), and its peak is
// compared with single-rank Attention's on the whole sequence.
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
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
  int64_t batch = 1, n = 8192, heads = 2, head_dim = 32;
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

// What the peaks are made of (C = one chunk, a [batch, n/k, heads,
// head_dim] float32 tensor; N = the whole one):
//   single rank, 5.03 N: out, dq, dk, dv, one more N-sized tensor of the
//   autograd engine, and lse (0.03 N).
//   ring, per rank: forward holds out + 2 x 2 K/V receive buffers; backward
//   out, dq, its own dK/dV, 2 x 4 receive buffers (K, V, dK, dV), the dK/dV
//   that come home, and whatever the rank keeps of the chunks whose trip
//   ends on it: ~14 C if those leave as their trip ends (2.8 x single / k),
//   16 C with one kept copy (3.2 x). A rank that keeps a copy of every chunk
//   ending on it (all k - 1 of them on the last rank, for causal attention on
//   contiguous chunks) holds O(n), not O(n / k): 26 C at k = 8.
// The bound, per-rank <= single / k * 1.25, cannot hold for any
// double-buffered ring: its receive buffers alone (K, V, dK, dV, incoming
// and current) are 8 C against single / k = 5 C. This test asserts instead:
//   (1) per-rank peak <= kRingFactor * single / k + kConstant for k = 1..8,
//       kRingFactor = 3.5 (16 chunk tensors / 5 whole ones, plus slack);
//   (2) the 1/k fall itself where every ring step double-buffers (k >= 4):
//       peak(8) <= peak(4) / 2 * 1.25 + kConstant.
// kConstant = 64 KiB covers allocations that do not scale with n / k (none
// are seen); it is 1/4 of the smallest chunk here (k = 8: 256 KiB), so it
// hides nothing that grows with the chunk. Sizes: n = 8192, batch 1, 2
// heads, head_dim 32 (N = 2 MiB); the whole test takes well under a second.
TEST(RingMemoryTest, PeakPerRankFallsAsOneOverK) {
  constexpr double kRingFactor = 3.5;
  constexpr int64_t kConstant = 64 << 10;
  Problem p;
  // Head 0: local segments of 256 tokens; head 1: one segment over the whole
  // sequence at dilation 16, so every rank needs every other rank's chunk
  // and the ring runs all k - 1 steps with its buffers (a dense pattern
  // would too, but costs 32x more time at this n). Causal, as in a language
  // model.
  DilatedOptions dilated;
  dilated.segment_lengths = {256, p.n};
  dilated.dilation_rates = {1, 16};
  p.pattern = testing::DilatedHeads(dilated, p.heads);
  p.options.causal = true;
  Generator gen = testing::TestGenerator();
  const Shape shape = {p.batch, p.n, p.heads, p.head_dim};
  p.q = Randn(shape, gen);
  p.k = Randn(shape, gen);
  p.v = Randn(shape, gen);
  p.grad_out = Randn(shape, gen);

  const int64_t single = SingleRankPeak(p);
  const int64_t tensor_bytes = p.batch * p.n * p.heads * p.head_dim * 4;
  std::cout << "[ memory   ] single rank: peak " << single << " bytes ("
            << double(single) / tensor_bytes << " N)\n";
  for (SequenceLayout layout :
       {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
    int64_t worst_at_4 = 0;
    for (int k : {1, 2, 4, 8}) {
      SCOPED_TRACE(absl::StrCat(SequenceLayoutName(layout), " k=", k));
      const std::vector<int64_t> peaks = RingPeaks(p, k, layout);
      int64_t worst = 0;
      std::string per_rank;
      for (int64_t peak : peaks) {
        worst = std::max(worst, peak);
        absl::StrAppend(&per_rank, " ", double(peak) * k / tensor_bytes);
      }
      std::cout << "[ memory   ] " << SequenceLayoutName(layout) << " k=" << k
                << ": worst rank " << double(worst) * k / single
                << " x single / k; per rank, in chunks:" << per_rank << "\n";
      EXPECT_LE(worst, kRingFactor * single / k + kConstant)
          << "per rank, in chunks:" << per_rank;
      if (k == 4) worst_at_4 = worst;
      if (k == 8) {
        EXPECT_LE(worst, worst_at_4 / 2 * 1.25 + kConstant)
            << "per rank, in chunks:" << per_rank;
      }
    }
  }
}

}  // namespace
}  // namespace lc
