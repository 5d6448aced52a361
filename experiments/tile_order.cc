// tile_order: forward and forward+backward time of block-sparse attention
// at each of a few lengths n with tiles visited row-major or along a Hilbert
// curve, for each generated block-sparse pattern (local_window, dilated_sparse,
// global_local, random). The two orders are timed alternately, call by
// call, so that load from other processes affects both alike; results are
// the same up to float rounding.
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "core/status.h"
#include "experiments/measure.h"
#include "experiments/scaling.h"

namespace lc {

absl::StatusOr<Table> RunTileOrder(const ScalingOptions& options) {
  const std::string name = "tile_order";
  if (!options.device.is_cpu()) {
    return absl::UnimplementedError(absl::StrCat(
        "tile_order on ", options.device.ToString(),
        ": the CUDA kernels build their own work lists in one fixed order "
        "(the tile order option steers the CPU kernels only), so there is "
        "no second order to compare; run it with --device=cpu"));
  }
  scaling::SetRankThreads(options, 1);

  Table table;
  table.experiment = name;
  table.columns = {"pattern",
                   "tile_order",
                   "n",
                   "density",
                   "forward_ms",
                   "forward_backward_ms",
                   "relative_to_row_major",
                   "cpu_share"};
  for (int64_t n : options.tile_order_lengths) {
    const scaling::AttentionInputs inputs =
        scaling::RandomInputs(options, n, options.dtype, 5);
    for (SparsePattern sparse :
         {SparsePattern::kLocalWindow, SparsePattern::kDilatedSparse,
          SparsePattern::kGlobalLocal, SparsePattern::kRandom}) {
      AttentionConfig config;
      config.type = AttentionType::kBlockSparse;
      config.block_sparse = options.block_sparse;
      config.block_sparse.pattern = sparse;
      LC_ASSIGN_OR_RETURN(const AttentionPattern pattern,
                          BuildAttentionPattern(config, options.heads, n));
      AttentionOptions orders[2] = {MakeAttentionOptions(config, false),
                                    MakeAttentionOptions(config, false)};
      orders[0].tile_order = TileOrder::kRowMajor;
      orders[1].tile_order = TileOrder::kHilbert;
      std::vector<scaling::CallSample> samples[2];
      for (int i = 0; i <= options.repeats; ++i) {
        for (int o = 0; o < 2; ++o) {
          const scaling::CallSample sample = scaling::MeasureOnce(
              options, inputs,
              [&](const Tensor& q, const Tensor& k, const Tensor& v) {
                return Attention(q, k, v, pattern, orders[o]).out;
              });
          if (i > 0) samples[o].push_back(sample);  // the first is a warm-up
        }
      }
      const scaling::CallCost row_major =
          scaling::Summarize(options, samples[0]);
      const scaling::CallCost hilbert = scaling::Summarize(options, samples[1]);
      const std::string pattern_name = scaling::SparsePatternName(sparse);
      const double density = pattern.block_mask->Density();
      for (const auto& [order, cost] : {std::make_pair("row_major", row_major),
                                        std::make_pair("hilbert", hilbert)}) {
        table.rows.push_back(
            {pattern_name, order, scaling::Cell(n), scaling::Cell(density, 4),
             scaling::Cell(cost.forward_ms, 2), scaling::Cell(cost.total_ms, 2),
             scaling::Cell(cost.total_ms / row_major.total_ms, 3),
             scaling::Cell(cost.cpu_share, 2)});
      }
      scaling::Progress(
          options, name,
          absl::StrFormat("%s n=%d (density %.3f): forward+backward "
                          "row-major %.1f ms, hilbert %.1f ms (%.3fx)",
                          pattern_name, n, density, row_major.total_ms,
                          hilbert.total_ms,
                          hilbert.total_ms / row_major.total_ms));
    }
  }
  const BlockSparseOptions& b = options.block_sparse;
  table.notes.push_back(
      absl::StrCat("batch ", options.batch, ", ", options.heads, " heads x ",
                   options.head_dim, ", ", DTypeName(options.dtype),
                   ", not causal, blocks of ", b.block_size, "; local_window ",
                   b.window, " tokens, dilated_sparse stride ", b.stride,
                   ", global_local ", b.global_tokens,
                   " global tokens + the window, "
                   "random density ",
                   b.density, "; median of ", options.repeats,
                   " calls per order, timed alternately"));
  return table;
}

}  // namespace lc
