// The ranks' agreement on a ring attention call: every rank must make its
// ring plan for the same problem (all but its own tokens), and each call
// with dropout or a key padding mask must draw the same offset and pass the
// same mask. One all-gather of a few integers and fingerprints finds the
// first field on which they differ. Internal to attention/.
#ifndef LONGCTX_ATTENTION_RING_AGREEMENT_H_
#define LONGCTX_ATTENTION_RING_AGREEMENT_H_

#include <cstdint>

#include "attention/attention_kernel.h"
#include "distributed/communicator.h"
#include "distributed/sequence_parallel.h"

namespace lc {

// Checks that every rank of `comm` made its plan for problem p with the
// same batch, heads, head_dim, dtype, n, layout, causality, pattern, block
// mask, scale and dropout. Throws lc::Error (InvalidArgument, on every rank
// alike) naming the first field on which the ranks disagree and each rank's
// value; a failed gather aborts the group and throws.
void CheckRingPlanAgreement(Communicator& comm, const AttentionProblem& p,
                            SequenceLayout layout);

// For a call with dropout or a key padding mask: checks that every rank
// drew the same dropout offset and passes the same mask, as above, and
// returns rank 0's dropout seed (the ring draws rank 0's stream).
uint64_t CheckRingCallAgreement(Communicator& comm, const AttentionProblem& p,
                                const AttentionCall& call);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_RING_AGREEMENT_H_
