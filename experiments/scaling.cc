#include "experiments/scaling.h"

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "core/status.h"

namespace lc {
namespace {

absl::Status Require(bool condition, const std::string& message) {
  return condition ? absl::OkStatus() : absl::InvalidArgumentError(message);
}

absl::Status ValidateScalingOptions(const ScalingOptions& o) {
  LC_RETURN_IF_ERROR(Require(
      o.repeats >= 1, absl::StrCat("repeats = ", o.repeats,
                                   " (expected at least 1 timed call)")));
  LC_RETURN_IF_ERROR(Require(
      o.threads >= 0,
      absl::StrCat("threads = ", o.threads, " (expected >= 0; 0: all cores)")));
  LC_RETURN_IF_ERROR(
      Require(o.batch >= 1 && o.heads >= 1 && o.head_dim >= 1,
              absl::StrCat("batch, heads, head_dim = ", o.batch, ", ", o.heads,
                           ", ", o.head_dim, " (expected each >= 1)")));
  LC_RETURN_IF_ERROR(
      Require(o.n >= 1, absl::StrCat("n = ", o.n, " (expected >= 1)")));
  LC_RETURN_IF_ERROR(
      Require(!o.ranks.empty() &&
                  *std::min_element(o.ranks.begin(), o.ranks.end()) >= 1,
              absl::StrCat("ranks = ", absl::StrJoin(o.ranks, ","),
                           " (expected a list of rank counts >= 1)")));
  LC_RETURN_IF_ERROR(
      Require(o.min_n >= 1 && o.min_n <= o.max_n,
              absl::StrCat("min_n = ", o.min_n, ", max_n = ", o.max_n,
                           " (expected 1 <= min_n <= max_n)")));
  LC_RETURN_IF_ERROR(Require(
      o.time_budget_s > 0,
      absl::StrCat("time budget ", o.time_budget_s, " s (expected > 0)")));
  LC_RETURN_IF_ERROR(Require(
      o.memory_budget > 0 && o.context_budget > 0,
      absl::StrCat("memory budget ", o.memory_budget, " and context budget ",
                   o.context_budget, " bytes (expected each > 0)")));
  LC_RETURN_IF_ERROR(
      Require(!o.tile_order_lengths.empty() &&
                  *std::min_element(o.tile_order_lengths.begin(),
                                    o.tile_order_lengths.end()) >= 1,
              absl::StrCat("tile_order lengths ",
                           absl::StrJoin(o.tile_order_lengths, ","),
                           " (expected a list of lengths >= 1)")));
  LC_RETURN_IF_ERROR(
      Require(!o.max_context_ranks.empty() &&
                  *std::min_element(o.max_context_ranks.begin(),
                                    o.max_context_ranks.end()) >= 1,
              absl::StrCat("max_context ranks ",
                           absl::StrJoin(o.max_context_ranks, ","),
                           " (expected a list of rank counts >= 1)")));
  LC_RETURN_IF_ERROR(Require(
      o.context_step >= 1,
      absl::StrCat("context step ", o.context_step, " (expected >= 1)")));
  return absl::OkStatus();
}

using ExperimentFn = absl::StatusOr<Table> (*)(const ScalingOptions&);

// The experiments in the order the binary runs them.
const std::vector<std::pair<std::string, ExperimentFn>>& Experiments() {
  static const auto* experiments =
      new std::vector<std::pair<std::string, ExperimentFn>>{
          {"memory_vs_ranks", RunMemoryVsRanks},
          {"time_vs_length", RunTimeVsLength},
          {"communication", RunCommunication},
          {"max_context", RunMaxContext},
          {"tile_order", RunTileOrder},
      };
  return *experiments;
}

}  // namespace

ScalingOptions DefaultScalingOptions(Device device) {
  ScalingOptions o;
  o.device = device;
  o.dilated.segment_lengths = {2048, 4096, 8192};
  o.dilated.dilation_rates = {1, 2, 4};
  o.block_sparse.pattern = SparsePattern::kLocalWindow;
  o.block_sparse.block_size = 64;
  o.block_sparse.window = 256;
  o.block_sparse.stride = 8;
  o.block_sparse.global_tokens = 64;
  o.block_sparse.density = 0.1;
  TransformerConfig& m = o.model;
  m.attention.type = AttentionType::kRingDilated;
  m.attention.dilated.segment_lengths = {256, 4096};
  m.attention.dilated.dilation_rates = {1, 16};
  m.attention.causal = true;
  m.device = device;
  if (device.is_cuda()) {
    m.dtype = DType::kBFloat16;  // mixed precision
    o.dtype = DType::kBFloat16;
    o.heads = 8;
    o.head_dim = 64;
    o.n = 131072;
    o.max_n = 4194304;
    o.time_budget_s = 2;
    o.memory_budget = int64_t{64} << 30;
    // k ranks share the one GPU: k budgets must fit in its memory.
    o.context_budget = int64_t{4} << 30;
    o.context_step = 8192;
  }
  return o;
}

const std::vector<std::string>& ExperimentNames() {
  static const auto* names = [] {
    auto* names = new std::vector<std::string>;
    for (const auto& [name, fn] : Experiments()) names->push_back(name);
    return names;
  }();
  return *names;
}

absl::StatusOr<Table> RunExperiment(const std::string& name,
                                    const ScalingOptions& options) {
  const auto it = std::find_if(
      Experiments().begin(), Experiments().end(),
      [&](const auto& experiment) { return experiment.first == name; });
  if (it == Experiments().end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("no experiment \"", name, "\" (expected one of ",
                     absl::StrJoin(ExperimentNames(), ", "), ")"));
  }
  LC_RETURN_IF_ERROR(ValidateScalingOptions(options));
  absl::StatusOr<Table> table;
  const absl::Status thrown =
      StatusFromCall([&] { table = it->second(options); });
  if (!thrown.ok()) return thrown;
  return table;
}

std::string TableCsv(const Table& table) {
  std::string csv = absl::StrCat(absl::StrJoin(table.columns, ","), "\n");
  for (const std::vector<std::string>& row : table.rows) {
    absl::StrAppend(&csv, absl::StrJoin(row, ","), "\n");
  }
  return csv;
}

std::string FormatTable(const Table& table) {
  const size_t columns = table.columns.size();
  std::vector<std::vector<std::string>> cells;
  std::vector<std::string> header;
  std::vector<bool> bytes(columns);
  for (size_t c = 0; c < columns; ++c) {
    bytes[c] = absl::EndsWith(table.columns[c], "_bytes");
    header.push_back(
        bytes[c] ? absl::StrReplaceAll(table.columns[c], {{"_bytes", "_MiB"}})
                 : table.columns[c]);
  }
  cells.push_back(header);
  for (const std::vector<std::string>& row : table.rows) {
    std::vector<std::string> shown;
    for (size_t c = 0; c < columns; ++c) {
      double value;
      if (bytes[c] && absl::SimpleAtod(row[c], &value)) {
        shown.push_back(absl::StrFormat("%.2f", value / 1048576.0));
      } else {
        shown.push_back(row[c]);
      }
    }
    cells.push_back(shown);
  }
  std::vector<size_t> width(columns, 0);
  for (const auto& row : cells) {
    for (size_t c = 0; c < columns; ++c) {
      width[c] = std::max(width[c], row[c].size());
    }
  }
  std::string text;
  for (size_t r = 0; r < cells.size(); ++r) {
    for (size_t c = 0; c < columns; ++c) {
      absl::StrAppend(&text, c > 0 ? "  " : "",
                      std::string(width[c] - cells[r][c].size(), ' '),
                      cells[r][c]);
    }
    absl::StrAppend(&text, "\n");
  }
  for (const std::string& note : table.notes) {
    absl::StrAppend(&text, "note: ", note, "\n");
  }
  return text;
}

}  // namespace lc
