// Ring (sequence-parallel) attention: each of k ranks holds n/k tokens of the
// sequence (contiguous or zigzag chunks, any n) and attends its queries to
// every rank's keys by passing K/V chunks around a ring (distributed/'s
// RingExchange): at step s a rank attends to the chunk of rank
// (rank - s) mod k while the next chunk is already in flight (send to
// rank + 1, receive from rank - 1, double buffered). Backward sends K/V
// around again with float accumulators of their gradients, which return to
// their owner; dq stays local. Only what a receiver can use travels: steps
// and transfers that no rank needs (no allowed (t, u) pair) are skipped, so
// dilated attention whose segments fit inside chunks communicates nothing,
// and a chunk travels cut down to the keys (per head and pattern) that the
// ranks still ahead on its trip attend, when that is less data than the
// whole chunk (1 row in r for a dilation rate r). Results equal
// single-rank Attention on the same tokens. The plan of a shape - each
// rank's steps, layouts and row maps (ring_plan.h), the work lists, and the
// ranks' agreement on the problem - is made once (MakeRingAttentionPlan) and
// serves every call.
//
// On CUDA tensors (with a communicator that carries them: k thread ranks on
// one GPU or several, or NCCL) each step runs the CUDA tile drivers on the
// step's chunk layout; bfloat16 inputs compute natively (K/V travel in
// bfloat16) with float32 out, lse and dK/dV accumulators (float64 for
// float64 inputs), out and the gradients converted to the inputs' dtype at
// the end. Every kernel goes on the calling thread's current stream, and
// the next chunk is posted before the current one is computed on: the copy
// runs on the communicator's own stream, and the compute stream waits for
// it (on the device, not the host) only before the step that reads it.
#ifndef LONGCTX_ATTENTION_RING_ATTENTION_H_
#define LONGCTX_ATTENTION_RING_ATTENTION_H_

#include <cstdint>
#include <memory>

#include "attention/attention.h"
#include "attention/attention_plan.h"
#include "distributed/communicator.h"
#include "distributed/sequence_parallel.h"

namespace lc {

// What one call moved and skipped on this rank, forward and backward added.
struct RingStats {
  int64_t bytes_sent = 0;      // K/V (and dK/dV) payload sent by this rank
  int64_t transfers = 0;       // tensors sent (the all-gather not counted)
  int64_t steps_computed = 0;  // ring steps with tiles for this rank
  int64_t steps_skipped = 0;   // ring steps with no tile for this rank
};

struct RingOptions {
  SequenceLayout layout = SequenceLayout::kContiguous;
  RingStats* stats = nullptr;  // when set, forward and backward add to it
};

// The plan of ring attention over this rank's tokens, inputs ([batch,
// n_local, heads, head_dim] on one device: the CPU or a CUDA device, as the
// communicator allows), RankSpans(n, comm.size(), comm.rank(), layout) in
// order. `pattern` describes the whole n-token sequence: positions stay
// global. Collective: every rank of the group makes its plan together, and
// their agreement on the problem is checked then (InvalidArgument on every
// rank, naming the field: batch, heads, head_dim, dtype, n, layout, causal,
// pattern, block mask, scale, dropout; found by one all-gather). `comm` (and
// ring.stats) must outlive the plan and every backward of its calls.
//
// Each call (AttentionPlan::Run) returns this rank's rows of out [batch,
// n_local, heads, head_dim] and lse [batch, heads, n_local], differentiable
// in q, k, v; backward communicates, so every rank of the group must run
// it. The call's key padding mask is the whole sequence's [batch, n], the
// same on every rank. A call with dropout or a key padding mask first
// checks that the ranks drew the same dropout offset and pass the same mask
// (one all-gather; ranks must agree on whether a mask is passed at all, or
// wait until the communicator's timeout); other calls communicate only in
// the ring. Attention dropout draws rank 0's stream: every rank takes its
// generator's next offset, as a one-rank call does, but the seed of rank 0's
// generator, so that ranks whose generators are seeded apart (a trainer's,
// for the dropout of their own tokens) still drop the same pairs, exactly
// those one rank with rank 0's generator drops.
//
// Throws lc::Error for bad inputs, for ranks that disagree and for
// communication failures (timeouts, aborted groups). An error on one rank
// (a bad input, found before any communication) aborts the group with it,
// so every rank fails at once.
std::shared_ptr<const AttentionPlan> MakeRingAttentionPlan(
    Communicator& comm, const TensorSpec& inputs, int64_t n,
    const AttentionPattern& pattern, const AttentionOptions& options = {},
    const RingOptions& ring = {});

// One call of a plan made for q: MakeRingAttentionPlan(comm, SpecOf(q), n,
// pattern, options, ring)->Run(q, k, v, call).
AttentionResult RingAttention(Communicator& comm, const Tensor& q,
                              const Tensor& k, const Tensor& v, int64_t n,
                              const AttentionPattern& pattern,
                              const AttentionOptions& options = {},
                              const RingOptions& ring = {},
                              const AttentionCallOptions& call = {});

}  // namespace lc

#endif  // LONGCTX_ATTENTION_RING_ATTENTION_H_
