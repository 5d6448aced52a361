// communication: the bytes ring attention sends per rank in one call
// (forward and backward, RingStats of the call), for k ranks and a dilation
// rate r, next to the formula derived from the pattern.
//
// The pattern: one dilated pattern (w = n, r, offset 0) on every head, not
// causal, contiguous chunks of n / k (n a multiple of k r). Every rank's
// queries attend the keys at positions = 0 (mod r) of every chunk: n / (k r)
// of each chunk's n / k rows per head, so a chunk travels cut down to those
// rows (for r = 1, whole), heads * n / (k r) rows of batch * head_dim float32
// values, and every rank needs every chunk: each chunk makes k - 1 hops.
// Forward: each rank sends K and V k - 1 times. Backward: K and V again,
// and the dK/dV accumulators (float32) k - 1 times (on to the next holder,
// and home from the last one). Per rank and call:
//
//   bytes = 6 (k - 1) * heads * n / (k r) * batch * head_dim * 4
//
// A ring that always sent whole chunks would send the r = 1 value at every r.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "attention/attention.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "experiments/measure.h"
#include "experiments/scaling.h"

namespace lc {
namespace {

// The formula above.
int64_t FormulaBytes(const ScalingOptions& options, int k, int64_t r) {
  return 6 * (k - 1) * options.heads * (options.n / (k * r)) * options.batch *
         options.head_dim * 4;
}

struct RankBytes {
  RingStats forward;
  RingStats total;
};

}  // namespace

absl::StatusOr<Table> RunCommunication(const ScalingOptions& options) {
  const std::string name = "communication";
  const int64_t n = options.n;
  std::vector<int> ranks;
  for (int k : options.ranks) {
    if (k > 1) ranks.push_back(k);
  }
  if (ranks.empty() || options.dilation_rates.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "communication: ranks ", absl::StrJoin(options.ranks, ","),
        " and dilation rates ", absl::StrJoin(options.dilation_rates, ","),
        " (expected a rank count > 1 and at least one rate)"));
  }
  for (int k : ranks) {
    for (int64_t r : options.dilation_rates) {
      if (r < 1 || n % (k * r) != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "communication: n = ", n, " with k = ", k,
            " ranks and rate r = ", r,
            " (expected r >= 1 and n a multiple of k * r, so that every "
            "chunk holds the same number of selected rows)"));
      }
    }
  }
  const scaling::AttentionInputs inputs =
      scaling::RandomInputs(options, n, DType::kFloat32, 3);

  Table table;
  table.experiment = name;
  table.columns = {"ranks",
                   "dilation_rate",
                   "n",
                   "forward_bytes",
                   "forward_backward_bytes",
                   "formula_bytes",
                   "whole_chunk_bytes",
                   "transfers",
                   "steps_computed",
                   "steps_skipped"};
  for (int k : ranks) {
    for (int64_t r : options.dilation_rates) {
      AttentionPattern pattern;
      pattern.head_patterns.assign(options.heads, {DilatedPattern{n, r, 0}});
      std::vector<RankBytes> bytes(k);
      LC_RETURN_IF_ERROR(RunRanks(k, [&](Communicator& comm) -> absl::Status {
        scaling::SetRankThreads(options, k);
        const int rank = comm.rank();
        Tensors local;
        for (const Tensor* t : {&inputs.q, &inputs.k, &inputs.v}) {
          local.push_back(
              SplitSequence(*t, k, rank, SequenceLayout::kContiguous).detach());
          local.back().set_requires_grad(true);
        }
        RingStats stats;
        RingOptions ring;
        ring.stats = &stats;
        const AttentionResult result = RingAttention(
            comm, local[0], local[1], local[2], n, pattern, {}, ring);
        bytes[rank].forward = stats;
        result.out.backward(SplitSequence(inputs.grad_out, k, rank,
                                          SequenceLayout::kContiguous));
        bytes[rank].total = stats;
        return absl::OkStatus();
      }));
      // The busiest rank (all ranks send the same here).
      const RankBytes& most =
          *std::max_element(bytes.begin(), bytes.end(),
                            [](const RankBytes& a, const RankBytes& b) {
                              return a.total.bytes_sent < b.total.bytes_sent;
                            });
      const int64_t formula = FormulaBytes(options, k, r);
      table.rows.push_back(
          {scaling::Cell(int64_t{k}), scaling::Cell(r), scaling::Cell(n),
           scaling::Cell(most.forward.bytes_sent),
           scaling::Cell(most.total.bytes_sent), scaling::Cell(formula),
           scaling::Cell(FormulaBytes(options, k, 1)),
           scaling::Cell(most.total.transfers),
           scaling::Cell(most.total.steps_computed),
           scaling::Cell(most.total.steps_skipped)});
      scaling::Progress(
          options, name,
          absl::StrFormat("k=%d r=%d: %d bytes sent per rank per call "
                          "(formula %d)%s",
                          k, r, most.total.bytes_sent, formula,
                          most.total.bytes_sent == formula ? "" : " MISMATCH"));
    }
  }
  table.notes.push_back(absl::StrCat(
      "pattern (w = n, r, 0) on all ", options.heads, " heads, batch ",
      options.batch, ", head_dim ", options.head_dim,
      ", float32, not causal, contiguous chunks; bytes of the busiest rank, "
      "forward + backward"));
  table.notes.push_back(
      "formula_bytes = 6 (k - 1) heads (n / (k r)) batch head_dim 4: K and V "
      "k - 1 hops forward, again backward with dK/dV (float32); each chunk "
      "cut down to the n / (k r) rows per head every rank uses");
  return table;
}

}  // namespace lc
