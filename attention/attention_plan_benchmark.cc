// Benchmark of the host-side planning an attention plan does once, when it
// is made (attention_plan.h): building the pattern (for block-sparse types, its
// block mask) and the CUDA kernels' work lists (query items for forward and dQ,
// key items for dK and dV; ForEachTile underneath, as on the CPU). It runs on
// the CPU, no GPU needed. Prints one row per attention type and length:
//
//   bazel run -c opt //attention:attention_plan_benchmark --
//       --lengths=65536,262144,1048576
// (one command line).

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "attention/attention_config.h"
#include "attention/attention_cuda_plan.h"
#include "attention/attention_kernel.h"
#include "core/cli.h"
#include "core/tensor.h"

ABSL_FLAG(std::vector<std::string>, lengths,
          std::vector<std::string>({"65536", "262144", "1048576"}),
          "Sequence lengths.");
ABSL_FLAG(int64_t, heads, 8, "Heads (each is planned on its own).");

namespace lc {
namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start)
      .count();
}

// Plans one call of `config` over n tokens and prints the row.
void PlanOnce(const AttentionConfig& config, int64_t n, int64_t heads) {
  Clock::time_point start = Clock::now();
  const AttentionPattern pattern =
      BuildAttentionPattern(config, heads, n).value();
  const double pattern_ms = MsSince(start);
  // The problem of inputs [1, n, heads, 64] (no tensor is allocated).
  const std::shared_ptr<const AttentionProblem> p =
      MakeAttentionProblem(TensorSpec{{1, n, heads, 64}, DType::kFloat32}, n,
                           pattern, MakeAttentionOptions(config, false));
  const TokenLayout all = TokenLayoutOf({PositionSpan{0, n}});
  start = Clock::now();
  const CudaWorkListHost queries =
      BuildCudaWorkList(*p, all, all, CudaWorkKind::kQueryItems);
  const double queries_ms = MsSince(start);
  start = Clock::now();
  const CudaWorkListHost keys =
      BuildCudaWorkList(*p, all, all, CudaWorkKind::kKeyItems);
  const double keys_ms = MsSince(start);
  std::printf("%-13s %9lld %12.1f %14.1f %12.1f %12zu\n",
              AttentionTypeName(config.type).c_str(), static_cast<long long>(n),
              pattern_ms, queries_ms, keys_ms, queries.tiles.size());
}

void Run() {
  const int64_t heads = absl::GetFlag(FLAGS_heads);
  const std::vector<int64_t> lengths = PositiveIntegersOrExit(
      "attention_plan_benchmark", "lengths", absl::GetFlag(FLAGS_lengths));
  std::printf(
      "host planning, %lld heads: dilated = segments 2048,4096,8192 rates "
      "1,2,4; block_sparse = local_window 256, blocks of 64\n",
      static_cast<long long>(heads));
  std::printf("%-13s %9s %12s %14s %12s %12s\n", "attention", "n", "pattern ms",
              "query plan ms", "key plan ms", "query tiles");
  for (AttentionType type :
       {AttentionType::kDilated, AttentionType::kBlockSparse}) {
    AttentionConfig config;
    config.type = type;
    if (type == AttentionType::kDilated) {
      config.dilated.segment_lengths = {2048, 4096, 8192};
      config.dilated.dilation_rates = {1, 2, 4};
    }
    for (int64_t n : lengths) {
      PlanOnce(config, n, heads);
    }
  }
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  lc::Run();
  return 0;
}
