// What the scaling experiments share: random attention inputs, timing and
// peak memory of one attention call (forward and backward), the training
// step of //train on k thread ranks with each rank's peak memory, a
// per-rank memory budget, and the formatting of table cells. Internal to
// experiments/.
#ifndef LONGCTX_EXPERIMENTS_MEASURE_H_
#define LONGCTX_EXPERIMENTS_MEASURE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attention/attention.h"
#include "core/device.h"
#include "core/tensor.h"
#include "experiments/scaling.h"

namespace lc {
namespace scaling {

// q, k, v and the gradient of the output, [batch, n, heads, head_dim] of
// standard normals on the options' device.
struct AttentionInputs {
  Tensor q, k, v, grad_out;
};
AttentionInputs RandomInputs(const ScalingOptions& options, int64_t n,
                             DType dtype, uint64_t seed);

// Sets this thread's OpenMP threads for a rank of a group of `ranks`:
// options.threads, or the cores divided among the ranks when it is 0.
void SetRankThreads(const ScalingOptions& options, int ranks);

// One attention call: forward (q, k, v leaves requiring grad -> out), then
// backward from grad_out.
using AttentionCall =
    std::function<Tensor(const Tensor& q, const Tensor& k, const Tensor& v)>;

struct CallSample {
  double forward_ms = 0;
  double total_ms = 0;     // forward + backward
  int64_t peak_bytes = 0;  // allocated during the call (inputs excluded)
  double cpu_ms = 0;       // CPU time of the process during the call
};

// Runs `call` once on fresh leaves of `inputs`, waiting for the device
// after forward and after backward.
CallSample MeasureOnce(const ScalingOptions& options,
                       const AttentionInputs& inputs,
                       const AttentionCall& call);

// The median of each field over samples; cpu_share is the CPU time over
// the wall time times the OpenMP threads (about 1 when the process had
// its cores; lower when other work took them), 0 on a GPU.
struct CallCost {
  double forward_ms = 0;
  double total_ms = 0;
  int64_t peak_bytes = 0;
  double cpu_share = 0;
  int calls = 0;
  // MeasureCall: the untimed first call (plans built), forward+backward.
  double first_call_ms = 0;
};
CallCost Summarize(const ScalingOptions& options,
                   const std::vector<CallSample>& samples);

// After an untimed first call (which builds the plans): options.repeats
// calls (the median), or one when the first call took longer than
// `budget_s`.
CallCost MeasureCall(const ScalingOptions& options,
                     const AttentionInputs& inputs, const AttentionCall& call,
                     double budget_s);

// One training step of options.model (on its device) with context n on k
// thread ranks, as //train takes it (batch 1 of random bytes, next-token
// targets): split the tokens among the ranks (contiguous), loss, backward,
// gradient all-reduce, clipping, AdamW. Returns each rank's peak bytes:
// everything the rank allocates from building its model and optimizer to the
// end of the step. With budget > 0 an allocation that would take a rank past
// `budget` bytes fails with ResourceExhausted, which fails the step (the
// returned status then has that code).
absl::StatusOr<std::vector<int64_t>> TrainingStepPeaks(
    const ScalingOptions& options, int k, int64_t n, bool recompute,
    int64_t budget);

// The pairs (query, key) that `pattern` lets attend over n tokens (not
// causal), summed over heads.
int64_t AttendedPairs(const AttentionPattern& pattern, int64_t n);

// "local_window", "dilated_sparse", "global_local", "random", "explicit".
std::string SparsePatternName(SparsePattern pattern);

// Writes "[experiment] line" to options.progress.
void Progress(const ScalingOptions& options, const std::string& experiment,
              const std::string& line);

// Cells: an integer, a number with `digits` after the point, MiB.
std::string Cell(int64_t value);
std::string Cell(double value, int digits);
std::string MiB(int64_t bytes);

}  // namespace scaling
}  // namespace lc

#endif  // LONGCTX_EXPERIMENTS_MEASURE_H_
