// memory_vs_ranks: for a fixed n, the peak bytes of the worst rank on k
// thread ranks, for ring attention forward+backward (the training model's
// dilated pattern, and dense attention; causal, as in the model) and for a
// whole training step, next to the ideal peak(k0) * k0 / k of the smallest
// k measured (k0 = 1 by default: single-rank Attention and a step without
// a sequence-parallel group).
#include <algorithm>
#include <chrono>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/memory.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "experiments/measure.h"
#include "experiments/scaling.h"

namespace lc {
namespace {

using scaling::AttentionInputs;
using scaling::Cell;

// The worst rank's peak bytes of attention forward+backward on k ranks
// (each rank's inputs and incoming gradient excluded: made before its
// scope). One rank runs Attention itself.
absl::StatusOr<int64_t> AttentionPeak(const ScalingOptions& options,
                                      const AttentionInputs& inputs,
                                      const AttentionPattern& pattern,
                                      const AttentionOptions& attention, int k,
                                      int64_t n) {
  if (k == 1) {
    scaling::SetRankThreads(options, 1);
    return scaling::MeasureOnce(
               options, inputs,
               [&](const Tensor& q, const Tensor& kk, const Tensor& v) {
                 return Attention(q, kk, v, pattern, attention).out;
               })
        .peak_bytes;
  }
  const SequenceLayout layout = options.model.attention.layout;
  std::vector<int64_t> peaks(k, 0);
  LC_RETURN_IF_ERROR(RunRanks(k, [&](Communicator& comm) -> absl::Status {
    scaling::SetRankThreads(options, k);
    const int rank = comm.rank();
    Tensors local;
    for (const Tensor* t : {&inputs.q, &inputs.k, &inputs.v}) {
      local.push_back(SplitSequence(*t, k, rank, layout).detach());
      local.back().set_requires_grad(true);
    }
    const Tensor grad_out = SplitSequence(inputs.grad_out, k, rank, layout);
    auto tracker = std::make_shared<MemoryTracker>();
    {
      MemoryScope scope(tracker);
      RingOptions ring;
      ring.layout = layout;
      const AttentionResult result = RingAttention(
          comm, local[0], local[1], local[2], n, pattern, attention, ring);
      result.out.backward(grad_out);
    }
    peaks[rank] = tracker->stats().peak_bytes;
    return absl::OkStatus();
  }));
  return *std::max_element(peaks.begin(), peaks.end());
}

}  // namespace

absl::StatusOr<Table> RunMemoryVsRanks(const ScalingOptions& options) {
  const std::string name = "memory_vs_ranks";
  const int64_t n = options.n;
  for (int k : options.ranks) {
    if (k > n) {
      return absl::InvalidArgumentError(
          absl::StrCat("memory_vs_ranks: ", k, " ranks for n = ", n,
                       " tokens (expected at most one rank per token)"));
    }
  }
  const AttentionConfig& config = options.model.attention;
  LC_ASSIGN_OR_RETURN(const AttentionPattern dilated,
                      BuildAttentionPattern(config, options.heads, n));
  AttentionPattern dense;
  dense.head_patterns.assign(options.heads, {DensePattern(n)});
  AttentionOptions attention;
  attention.causal = config.causal;
  const AttentionInputs inputs =
      scaling::RandomInputs(options, n, options.dtype, 1);

  Table table;
  table.experiment = name;
  table.columns = {"ranks",
                   "n",
                   "tokens_per_rank",
                   "dilated_attention_bytes",
                   "dilated_attention_ideal_bytes",
                   "dense_attention_bytes",
                   "dense_attention_ideal_bytes",
                   "training_step_bytes",
                   "training_step_ideal_bytes"};
  std::vector<int> ranks = options.ranks;
  std::sort(ranks.begin(), ranks.end());
  const int k0 = ranks.front();
  int64_t dilated0 = 0, dense0 = 0, step0 = 0;
  for (int k : ranks) {
    const auto start = std::chrono::steady_clock::now();
    LC_ASSIGN_OR_RETURN(
        const int64_t dilated_peak,
        AttentionPeak(options, inputs, dilated, attention, k, n));
    LC_ASSIGN_OR_RETURN(const int64_t dense_peak,
                        AttentionPeak(options, inputs, dense, attention, k, n));
    LC_ASSIGN_OR_RETURN(
        const std::vector<int64_t> step_peaks,
        scaling::TrainingStepPeaks(options, k, n, options.model.recompute, 0));
    const int64_t step_peak =
        *std::max_element(step_peaks.begin(), step_peaks.end());
    if (k == k0) {
      dilated0 = dilated_peak;
      dense0 = dense_peak;
      step0 = step_peak;
    }
    auto ideal = [&](int64_t peak0) { return Cell(peak0 * k0 / k); };
    table.rows.push_back({Cell(int64_t{k}), Cell(n),
                          Cell(RankTokenCount(n, k, 0, config.layout)),
                          Cell(dilated_peak), ideal(dilated0), Cell(dense_peak),
                          ideal(dense0), Cell(step_peak), ideal(step0)});
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    scaling::Progress(
        options, name,
        absl::StrFormat("k=%d, n=%d: worst rank's peak: dilated attention %s, "
                        "dense attention %s, training step %s (%.1f s)",
                        k, n, scaling::MiB(dilated_peak),
                        scaling::MiB(dense_peak), scaling::MiB(step_peak),
                        seconds));
  }
  table.notes.push_back(absl::StrCat(
      "attention: batch ", options.batch, ", ", options.heads, " heads x ",
      options.head_dim, ", ", DTypeName(options.dtype),
      ", causal; dilated = the model's pattern (",
      AttentionTypeName(config.type), "), ", SequenceLayoutName(config.layout),
      " layout; bytes exclude each rank's inputs and incoming gradient"));
  table.notes.push_back(absl::StrCat(
      "training step: the //train model (", options.model.num_layers,
      " layers, d_model ", options.model.d_model, ", ", options.model.num_heads,
      " heads, ", DTypeName(options.model.dtype),
      "), batch 1; bytes include the rank's weights, gradients and AdamW "
      "moments"));
  return table;
}

}  // namespace lc
