// The scaling experiments of `bazel run //experiments:scaling`: how memory
// per rank, time and communication grow with the sequence length n and the
// rank count k, how long a context a training step fits in a memory budget,
// and whether Hilbert tile order helps. Each experiment returns a Table that
// the binary prints, writes as CSV and hands to plot_scaling.py; the tests
// run the same functions at tiny sizes.
//
//  memory_vs_ranks  fixed n, k = 1, 2, 4, 8 thread ranks: the worst rank's
//                   peak bytes for ring attention forward+backward (dilated
//                   and dense) and for a whole training step, next to the
//                   ideal peak(k = 1) / k.
//  time_vs_length   one rank, n doubling from min_n: dilated, block-sparse
//                   and dense attention forward and forward+backward time
//                   and peak bytes, until a call exceeds the time or memory
//                   budget (so dense, quadratic, stops first).
//  communication    bytes ring attention sends per rank per call (forward +
//                   backward, from RingStats) against k and the dilation
//                   rate r of one pattern (w = n, r) on every head, next to
//                   6 (k - 1) heads (n / (k r)) batch head_dim 4 bytes.
//  max_context      the longest context a training step fits in a per-rank
//                   memory budget, per rank count, with and without
//                   recomputation (a budget allocator fails the allocation
//                   that would cross the budget; binary search over n).
//  tile_order       row-major against Hilbert tile order, time per call,
//                   for each block-sparse pattern, at a few lengths.
#ifndef LONGCTX_EXPERIMENTS_SCALING_H_
#define LONGCTX_EXPERIMENTS_SCALING_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attention/pattern.h"
#include "core/device.h"
#include "core/dtype.h"
#include "models/transformer_lm.h"

namespace lc {

struct ScalingOptions {
  Device device = Device::Cpu();
  // Compute dtype of the attention-only experiments (communication always
  // runs float32, so that its formula counts 4-byte elements).
  DType dtype = DType::kFloat32;
  // OpenMP threads per rank; 0: the cores divided among the ranks.
  int threads = 0;
  // Timed calls per configuration (the median is reported).
  int repeats = 3;
  // Shape of the attention-only experiments: q, k, v are
  // [batch, n, heads, head_dim].
  int64_t batch = 1;
  int64_t heads = 4;
  int64_t head_dim = 32;
  // Sequence length of memory_vs_ranks and communication.
  int64_t n = 8192;
  // Rank counts of memory_vs_ranks and communication (k = 1 is left out of
  // communication: one rank sends nothing).
  std::vector<int> ranks = {1, 2, 4, 8};
  // time_vs_length: n = min_n, 2 min_n, ... <= max_n while the previous
  // call stayed within time_budget_s (forward+backward) and memory_budget
  // bytes.
  int64_t min_n = 1024;
  int64_t max_n = 65536;
  double time_budget_s = 4;
  int64_t memory_budget = int64_t{1} << 30;
  // The dilated pattern of time_vs_length (head groups); the block-sparse
  // patterns of time_vs_length (block_sparse.pattern) and tile_order (all
  // four generated patterns with these parameters).
  DilatedOptions dilated;
  BlockSparseOptions block_sparse;
  // communication: the dilation rates r of the pattern (w = n, r); n must
  // be a multiple of k * r for every k and r.
  std::vector<int64_t> dilation_rates = {1, 2, 4, 8, 16};
  // tile_order: the sequence lengths (K and V within the caches, and
  // beyond them).
  std::vector<int64_t> tile_order_lengths = {8192, 32768};
  // The model of memory_vs_ranks' and max_context's training steps (its
  // context is set per configuration; attention must be ring_dilated, the
  // //train default).
  TransformerConfig model;
  // max_context: the budget in bytes per rank, the rank counts, and
  // contexts searched in multiples of context_step tokens.
  int64_t context_budget = int64_t{96} << 20;
  std::vector<int> max_context_ranks = {1, 2, 4};
  int64_t context_step = 512;
  // A line per configuration goes here (none when null).
  std::ostream* progress = nullptr;
};

// The defaults for `device`: CPU sizes that run every experiment in a few
// minutes on 2 cores, or GPU sizes (longer n, bfloat16 attention, a larger
// budget). The model is the //train default (2 layers, d_model 64, 4 heads,
// ring_dilated with segments 256,4096 and rates 1,16, causal).
ScalingOptions DefaultScalingOptions(Device device);

// One experiment's results: named columns, one row per configuration, as
// text (numbers written in full),
// and notes printed under the table.
struct Table {
  std::string experiment;
  std::vector<std::string> columns;
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> notes;
};

// The experiments in the order the binary runs them.
const std::vector<std::string>& ExperimentNames();

// Runs experiment `name` (one of ExperimentNames()). Errors: an unknown
// name, invalid options (naming the value), Unimplemented for an experiment
// that does not apply to the device (tile_order on CUDA, whose kernels have
// one fixed tile order), a configuration the device cannot run (naming
// what is missing), a failing rank.
absl::StatusOr<Table> RunExperiment(const std::string& name,
                                    const ScalingOptions& options);

// The table as CSV: a header line with the column names, then the rows.
std::string TableCsv(const Table& table);
// The table for a terminal: aligned columns, bytes columns (named *_bytes)
// in MiB, then the notes.
std::string FormatTable(const Table& table);

// The experiments, one per file (experiments/<name>.cc).
absl::StatusOr<Table> RunMemoryVsRanks(const ScalingOptions& options);
absl::StatusOr<Table> RunTimeVsLength(const ScalingOptions& options);
absl::StatusOr<Table> RunCommunication(const ScalingOptions& options);
absl::StatusOr<Table> RunMaxContext(const ScalingOptions& options);
absl::StatusOr<Table> RunTileOrder(const ScalingOptions& options);

}  // namespace lc

#endif  // LONGCTX_EXPERIMENTS_SCALING_H_
