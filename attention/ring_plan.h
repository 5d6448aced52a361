// The ring's schedule for one rank (ring attention, ring_attention.h): which
// chunk it holds at each step, whether its queries use it, the layout each
// chunk travels in (cut down to the keys its later holders use), where the
// gradient accumulators travel and come home, and the row maps between
// those layouts. Derived identically on every rank from the problem alone,
// so senders and receivers agree on every transfer and its size without
// asking each other. Each rank plans only its own steps, from questions
// about runs of ranks rather than rank by rank: O(k) memory per rank and
// O(k log k) passes over a chunk's tiles. Internal to attention/.
#ifndef LONGCTX_ATTENTION_RING_PLAN_H_
#define LONGCTX_ATTENTION_RING_PLAN_H_

#include <map>
#include <vector>

#include "attention/attention_kernel.h"
#include "core/tensor.h"
#include "distributed/ring_exchange.h"
#include "distributed/sequence_parallel.h"

namespace lc {

// What one rank does at one ring step, forward and backward alike.
struct RingStep {
  int origin = 0;             // whose chunk it holds: (rank - step) mod size
  bool held = false;          // the chunk gets here (a holder here or later
                              // uses it)
  bool needs = false;         // this rank's queries use keys of it
  bool forwarded = false;     // it goes on to rank + 1 (a later holder uses it)
  TokenLayout layout;         // held: the layout it is held in
  TokenLayout carried;        // forwarded: the layout it goes on in
  bool carried_same = false;  // forwarded in the layout it is held in
  // Backward: the chunk's dK/dV accumulators come with it from rank - 1,
  // go on with it, or go home to its origin after this step. They exist
  // from the first holder (step >= 1) that uses the chunk; they go on while
  // the chunk keeps its layout, and home when it changes (the next holders
  // use fewer keys and start new accumulators) or the trip ends.
  bool grads_in = false, grads_on = false, grads_home = false;
  // This rank's own accumulators come home at this step, in layout `home`.
  bool ours_come_home = false;
  TokenLayout home;
};

// This rank's part of the ring: its steps, derived identically on every
// rank (so that senders and receivers agree on every transfer and its size
// without asking each other), in O(size) memory.
struct RingPlan {
  int size = 1, rank = 0;
  TokenLayout mine;   // this rank's tokens
  int last_step = 0;  // the last ring step any rank computes
  // Steps 0 .. last_step, then one that holds nothing (the "next" of the
  // last step).
  std::vector<RingStep> steps;

  int Origin(int holder, int step) const {
    return ((holder - step) % size + size) % size;
  }
  int Holder(int origin, int step) const { return (origin + step) % size; }

  // Row maps (int64 on the problem's device; see AttentionDriver's
  // GatherRows and AddRows), by step: of the cut-down copy of the chunk held
  // at that step (where it goes on in fewer keys); of this rank's
  // accumulators coming home at that step (where they come in another
  // layout than this rank's tokens).
  std::map<int, Tensor> carry_maps;
  std::map<int, Tensor> home_maps;
};

// This rank's plan of the ring of `size` ranks for problem p (whose
// sequence the ranks hold in `layout`), with its row maps on p's device.
RingPlan MakeRingPlan(const AttentionProblem& p, int size, int rank,
                      SequenceLayout layout);

// The shape of a K/V chunk (or gradient) buffer of `layout`, and the specs
// of a K/V pair of them.
Shape ChunkShape(const AttentionProblem& p, const TokenLayout& layout);
std::vector<TensorSpec> ChunkSpecs(const AttentionProblem& p,
                                   const TokenLayout& layout, DType dtype,
                                   Device device);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_RING_PLAN_H_
