// max_context: the longest context (a multiple of context_step tokens) at
// which one training step of the model fits in a per-rank memory budget,
// for each rank count, without and with recomputation.
//
// "Fits" is decided by running the step with a budget allocator: an
// allocation that would take a rank's tensor bytes (everything it allocates
// from building its model and optimizer on: weights, gradients, AdamW
// moments, activations, attention buffers) past the budget fails with
// ResourceExhausted, which fails the step. So a context fits exactly when
// the rank's peak tensor bytes stay within the budget; allocator overhead,
// stacks and non-tensor buffers are not counted. The search doubles the
// context from context_step * k until a step fails, then bisects.
#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/status.h"
#include "experiments/measure.h"
#include "experiments/scaling.h"

namespace lc {
namespace {

// The worst rank's peak when a step at context n fits the budget, nullopt
// when it does not.
absl::StatusOr<std::optional<int64_t>> Fits(const ScalingOptions& options,
                                            int k, int64_t n, bool recompute) {
  const auto start = std::chrono::steady_clock::now();
  const absl::StatusOr<std::vector<int64_t>> peaks = scaling::TrainingStepPeaks(
      options, k, n, recompute, options.context_budget);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  const std::string what =
      absl::StrFormat("k=%d%s n=%d:", k, recompute ? " recompute" : "", n);
  if (!peaks.ok()) {
    if (peaks.status().code() != absl::StatusCode::kResourceExhausted) {
      return peaks.status();
    }
    scaling::Progress(
        options, "max_context",
        absl::StrFormat("%s over the budget (%.1f s)", what, seconds));
    return std::optional<int64_t>();
  }
  const int64_t peak = *std::max_element(peaks->begin(), peaks->end());
  scaling::Progress(options, "max_context",
                    absl::StrFormat("%s fits, peak %s (%.1f s)", what,
                                    scaling::MiB(peak), seconds));
  return std::optional<int64_t>(peak);
}

}  // namespace

absl::StatusOr<Table> RunMaxContext(const ScalingOptions& options) {
  const std::string name = "max_context";
  Table table;
  table.experiment = name;
  table.columns = {"ranks",           "recompute",  "max_context",
                   "tokens_per_rank", "peak_bytes", "budget_bytes",
                   "steps_run"};
  const int64_t step = options.context_step;
  for (int k : options.max_context_ranks) {
    for (bool recompute : {false, true}) {
      int64_t fits = 0, fails = 0, fits_peak = 0, steps_run = 0;
      auto probe = [&](int64_t n) -> absl::StatusOr<bool> {
        ++steps_run;
        LC_ASSIGN_OR_RETURN(const std::optional<int64_t> peak,
                            Fits(options, k, n, recompute));
        if (peak.has_value()) {
          fits = n;
          fits_peak = *peak;
        } else {
          fails = n;
        }
        return peak.has_value();
      };
      for (int64_t n = step * k;; n *= 2) {
        LC_ASSIGN_OR_RETURN(const bool fit, probe(n));
        if (!fit) break;
      }
      while (fails - fits > step) {
        LC_RETURN_IF_ERROR(
            probe(fits + (fails - fits) / 2 / step * step).status());
      }
      table.rows.push_back({scaling::Cell(int64_t{k}), recompute ? "1" : "0",
                            scaling::Cell(fits), scaling::Cell(fits / k),
                            scaling::Cell(fits_peak),
                            scaling::Cell(options.context_budget),
                            scaling::Cell(steps_run)});
      scaling::Progress(
          options, name,
          absl::StrFormat("k=%d%s: longest context %d tokens (%d per rank), "
                          "peak %s of %s",
                          k, recompute ? " with recompute" : "", fits, fits / k,
                          scaling::MiB(fits_peak),
                          scaling::MiB(options.context_budget)));
    }
  }
  const TransformerConfig& m = options.model;
  table.notes.push_back(absl::StrCat(
      "training step of the //train model (", m.num_layers, " layers, d_model ",
      m.d_model, ", ", m.num_heads, " heads, ",
      AttentionTypeName(m.attention.type), " segments ",
      absl::StrJoin(m.attention.dilated.segment_lengths, ","), " rates ",
      absl::StrJoin(m.attention.dilated.dilation_rates, ","),
      ", causal), batch 1, contexts in multiples of ", step,
      " tokens; fits = no rank's tensor bytes ever exceed the budget "
      "(a budget allocator fails the allocation that would)"));
  for (const std::vector<std::string>& row : table.rows) {
    if (row[2] == "0") {
      table.notes.push_back(
          "max_context 0: even the smallest context tried did not fit");
      break;
    }
  }
  return table;
}

}  // namespace lc
