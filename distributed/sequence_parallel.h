// Sequence (context) parallelism helpers: which token positions each of k
// ranks holds in the contiguous and zigzag layouts, splitting a [batch, n,
// ...] tensor into a rank's tokens and gathering it back, and the all-reduce
// of parameter gradients that keeps replicated weights in step. Tensors may
// live on the CPU or a CUDA device (the communicator must carry them, as the
// threads backend does both); results stay on the input's device.
#ifndef LONGCTX_DISTRIBUTED_SEQUENCE_PARALLEL_H_
#define LONGCTX_DISTRIBUTED_SEQUENCE_PARALLEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/position_span.h"
#include "core/tensor.h"
#include "distributed/communicator.h"

namespace lc {

// How a sequence is cut among k ranks.
//   kContiguous: k chunks; rank r holds chunk r.
//   kZigzag: 2k chunks; rank r holds chunks r and 2k-1-r, which balances the
//     work of causal attention across ranks.
// Chunk sizes differ by at most one token: the first n % m of the m chunks
// are one token longer.
enum class SequenceLayout { kContiguous, kZigzag };

// "contiguous" or "zigzag"; InvalidArgument naming the text otherwise.
absl::StatusOr<SequenceLayout> ParseSequenceLayout(const std::string& text);
std::string SequenceLayoutName(SequenceLayout layout);

// The spans rank `rank` of `k` holds of an n-token sequence, in the order
// the rank stores them: one span (contiguous) or two (zigzag: chunk rank,
// then chunk 2k-1-rank). Spans are empty when n is smaller than the number of
// chunks (e.g. the last ranks hold nothing when n < k). Throws lc::Error
// unless n >= 0, k >= 1 and 0 <= rank < k.
std::vector<PositionSpan> RankSpans(int64_t n, int k, int rank,
                                    SequenceLayout layout);
// The number of tokens rank `rank` holds: the sum of its span sizes.
int64_t RankTokenCount(int64_t n, int k, int rank, SequenceLayout layout);

// x [batch, n, ...] -> this rank's tokens [batch, RankTokenCount, ...], its
// spans concatenated in order (a new contiguous tensor). Differentiable: the
// gradient flows back into x's rows of this rank. Throws lc::Error for x of
// rank < 2 or bad k/rank.
Tensor SplitSequence(const Tensor& x, int k, int rank, SequenceLayout layout);

// The inverse of SplitSequence across the group: from each rank's `local`
// [batch, RankTokenCount(n, size, rank), ...], the full [batch, n, ...] on
// every rank, positions in order. Not differentiable (the result has no
// history). Ranks holding fewer tokens are padded to the largest count for
// one AllGather. A rank whose `local` does not fit returns InvalidArgument
// without taking part, so the others fail with the communicator's timeout
// (or at once under RunRanks, which aborts the group).
absl::StatusOr<Tensor> GatherSequence(Communicator& communicator,
                                      const Tensor& local, int64_t n,
                                      SequenceLayout layout);

// Sums every parameter's .grad across the ranks, in place, so each rank
// holds the total. A parameter whose .grad is undefined (no gradient reached
// it on this rank) counts as zeros: it gets a zero .grad first, so every rank
// takes part in the same collectives and ends with the sum. Gradients of
// fewer than 64 Ki bytes (and strided ones) are packed into one flat buffer
// per dtype and reduced together; larger ones are reduced in place one by
// one. Every rank must pass the same parameters (shapes and dtypes) in the
// same order. Sums are exact float64 sums in rank order (see AllReduceSum),
// so the result is the same on every rank. A group of one rank only fills
// the missing gradients (nothing is copied or sent).
absl::Status AllReduceGradients(Communicator& communicator,
                                const std::vector<Tensor>& params);

}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_SEQUENCE_PARALLEL_H_
