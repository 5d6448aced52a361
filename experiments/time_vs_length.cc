// time_vs_length: one rank, n = min_n, 2 min_n, ... up to max_n: forward
// and forward+backward time and peak bytes of dilated, block-sparse and
// dense attention (not causal). An attention type's sweep ends after the
// first call that takes longer than the time budget or allocates more than
// the memory budget, so dense attention, quadratic in n, stops first.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "core/status.h"
#include "experiments/measure.h"
#include "experiments/scaling.h"

namespace lc {

absl::StatusOr<Table> RunTimeVsLength(const ScalingOptions& options) {
  const std::string name = "time_vs_length";
  AttentionConfig dilated;
  dilated.type = AttentionType::kDilated;
  dilated.dilated = options.dilated;
  AttentionConfig block_sparse;
  block_sparse.type = AttentionType::kBlockSparse;
  block_sparse.block_sparse = options.block_sparse;
  AttentionConfig dense;
  dense.type = AttentionType::kDense;
  for (const AttentionConfig* config : {&dilated, &block_sparse, &dense}) {
    LC_RETURN_IF_ERROR(ValidateAttentionConfig(*config));
  }
  scaling::SetRankThreads(options, 1);

  Table table;
  table.experiment = name;
  table.columns = {"attention",
                   "n",
                   "pairs",
                   "forward_ms",
                   "forward_backward_ms",
                   "forward_backward_gflops",
                   "peak_bytes",
                   "cpu_share",
                   "calls"};
  for (const AttentionConfig* config : {&dilated, &block_sparse, &dense}) {
    const std::string type = AttentionTypeName(config->type);
    for (int64_t n = options.min_n; n <= options.max_n; n *= 2) {
      LC_ASSIGN_OR_RETURN(const AttentionPattern pattern,
                          BuildAttentionPattern(*config, options.heads, n));
      const AttentionOptions attention = MakeAttentionOptions(*config, false);
      const scaling::AttentionInputs inputs =
          scaling::RandomInputs(options, n, options.dtype, n);
      const int64_t pairs = scaling::AttendedPairs(pattern, n);
      const scaling::CallCost cost = scaling::MeasureCall(
          options, inputs,
          [&](const Tensor& q, const Tensor& k, const Tensor& v) {
            return Attention(q, k, v, pattern, attention).out;
          },
          options.time_budget_s);
      // FlashAttention's count: 4 d FLOPs per pair forward, 10 d backward.
      const double gflops = 14.0 * options.head_dim * pairs * options.batch /
                            (cost.total_ms * 1e6);
      table.rows.push_back(
          {type, scaling::Cell(n), scaling::Cell(pairs),
           scaling::Cell(cost.forward_ms, 2), scaling::Cell(cost.total_ms, 2),
           scaling::Cell(gflops, 2), scaling::Cell(cost.peak_bytes),
           scaling::Cell(cost.cpu_share, 2),
           scaling::Cell(int64_t{cost.calls})});
      scaling::Progress(
          options, name,
          absl::StrFormat("%s n=%d: forward %.1f ms, forward+backward %.1f ms "
                          "(%.1f GFLOP/s), peak %s",
                          type, n, cost.forward_ms, cost.total_ms, gflops,
                          scaling::MiB(cost.peak_bytes)));
      // The first call counts against the budget too: it builds the
      // pattern's tile plans on the host, which for block-sparse patterns
      // grows with the square of the blocks (the block mask is dense).
      if (std::max(cost.total_ms, cost.first_call_ms) >
              options.time_budget_s * 1e3 ||
          cost.peak_bytes > options.memory_budget) {
        if (n * 2 <= options.max_n) {
          table.notes.push_back(absl::StrFormat(
              "%s stops at n = %d: its call took %.2f s (the first, building "
              "the plans, %.2f s; budget %.2f s) and %s (budget %s)",
              type, n, cost.total_ms / 1e3, cost.first_call_ms / 1e3,
              options.time_budget_s, scaling::MiB(cost.peak_bytes),
              scaling::MiB(options.memory_budget)));
        }
        break;
      }
    }
  }
  table.notes.push_back(absl::StrCat(
      "batch ", options.batch, ", ", options.heads, " heads x ",
      options.head_dim, ", ", DTypeName(options.dtype),
      ", not causal; dilated: segments ",
      absl::StrJoin(options.dilated.segment_lengths, ","), " rates ",
      absl::StrJoin(options.dilated.dilation_rates, ","), "; block_sparse: ",
      scaling::SparsePatternName(options.block_sparse.pattern), ", blocks of ",
      options.block_sparse.block_size,
      "; pairs: attended (query, key) pairs summed over heads; GFLOP/s count "
      "14 head_dim per pair (forward 4, backward 10)"));
  return table;
}

}  // namespace lc
