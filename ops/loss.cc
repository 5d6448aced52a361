#include "ops/loss.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/loss_cuda.h"
#include "ops/shape_ops.h"

namespace lc {
namespace {

// For dense logits [rows, classes]: lse[i] = logsumexp_c logits[i, c] for
// every row, and returns sum over rows with target != ignore_index of
// lse[i] - logits[i, target[i]].
template <typename T>
double CrossEntropyForwardLoop(const T* logits, const int64_t* target,
                               int64_t rows, int64_t classes,
                               int64_t ignore_index, double* lse) {
  double total = 0;
  const bool parallel = rows * classes > 4096;
#pragma omp parallel for schedule(static) reduction(+ : total) if (parallel)
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = logits + i * classes;
    const double max = *std::max_element(row, row + classes);
    double sum = 0;
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(row[c] - max);
    const double row_lse = max + std::log(sum);
    lse[i] = row_lse;
    if (target[i] != ignore_index) total += row_lse - row[target[i]];
  }
  return total;
}

// The gradient of the summed loss scaled by `scale` (g for the sum, g / count
// for the mean):
//   dlogits[i, c] = scale * (exp(logits[i, c] - lse[i]) - [c == target[i]])
// for rows with target != ignore_index, 0 for ignored rows.
template <typename T>
void CrossEntropyBackwardLoop(const T* logits, const int64_t* target,
                              const double* lse, int64_t rows, int64_t classes,
                              int64_t ignore_index, double scale, T* dlogits) {
#pragma omp parallel for schedule(static) if (rows * classes > 4096)
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = logits + i * classes;
    T* drow = dlogits + i * classes;
    if (target[i] == ignore_index) {
      std::fill(drow, drow + classes, T(0));
      continue;
    }
    for (int64_t c = 0; c < classes; ++c) {
      const double p = std::exp(row[c] - lse[i]);
      drow[c] = static_cast<T>(scale * (p - (c == target[i] ? 1.0 : 0.0)));
    }
  }
}

// For dense floating logits [rows, classes] and dense int64 targets [rows]
// on one device (each target in [0, classes) or ignore_index):
//   lse[i] = logsumexp_c logits[i, c]   (dense [rows] of StatsDType),
//   count[0] = the number of rows with targets[i] != ignore_index (int64 [1]),
//   loss[] = sum over those rows of (lse[i] - logits[i, targets[i]]),
//            divided by count when `mean` (0 when count = 0) (a scalar of
//            logits' dtype).
using CrossEntropyForwardKernel = void(const Tensor& logits,
                                       const Tensor& targets,
                                       int64_t ignore_index, bool mean,
                                       const Tensor& lse, const Tensor& count,
                                       const Tensor& loss);

// CrossEntropyForwardKernel on the CPU, in float64.
void CrossEntropyForwardCpu(const Tensor& logits, const Tensor& targets,
                            int64_t ignore_index, bool mean, const Tensor& lse,
                            const Tensor& count, const Tensor& loss) {
  const int64_t rows = logits.size(0);
  const int64_t* target_data = targets.data<int64_t>();
  const int64_t scored =
      rows - std::count(target_data, target_data + rows, ignore_index);
  count.data<int64_t>()[0] = scored;
  LC_DISPATCH_FLOATING(logits.dtype(), "CrossEntropy", [&] {
    const double total = CrossEntropyForwardLoop(
        logits.data<scalar_t>(), target_data, rows, logits.size(1),
        ignore_index, lse.data<double>());
    // Ignored rows add 0 to `total`: with every row ignored the sum is 0.
    double value = total;
    if (mean) value = scored > 0 ? total / scored : 0.0;
    loss.data<scalar_t>()[0] = static_cast<scalar_t>(value);
  });
}

// The gradient of the loss for the upstream scalar gradient g (logits'
// dtype, on the device) and `mean` as in the forward: dlogits [rows,
// classes] (dense) =
//   s * (exp(logits[i, c] - lse[i]) - [c == targets[i]])
// with s = g / count for the mean (0 when count = 0) and s = g for the sum,
// on rows whose target is not ignore_index, 0 on the others.
using CrossEntropyBackwardKernel = void(const Tensor& logits,
                                        const Tensor& targets,
                                        int64_t ignore_index, bool mean,
                                        const Tensor& lse, const Tensor& count,
                                        const Tensor& g, const Tensor& dlogits);

// CrossEntropyBackwardKernel on the CPU.
void CrossEntropyBackwardCpu(const Tensor& logits, const Tensor& targets,
                             int64_t ignore_index, bool mean, const Tensor& lse,
                             const Tensor& count, const Tensor& g,
                             const Tensor& dlogits) {
  const int64_t scored = count.data<int64_t>()[0];
  LC_DISPATCH_FLOATING(logits.dtype(), "CrossEntropy", [&] {
    scalar_t* dx = dlogits.data<scalar_t>();
    if (mean && scored == 0) {
      std::fill_n(dx, dlogits.numel(), scalar_t(0));
      return;
    }
    const double scale = mean ? g.item() / scored : g.item();
    CrossEntropyBackwardLoop(logits.data<scalar_t>(), targets.data<int64_t>(),
                             lse.data<double>(), logits.size(0), logits.size(1),
                             ignore_index, scale, dx);
  });
}

constexpr PerDevice<CrossEntropyForwardKernel*> kCrossEntropyForward = {
    CrossEntropyForwardCpu, internal::CrossEntropyForwardCuda};
constexpr PerDevice<CrossEntropyBackwardKernel*> kCrossEntropyBackward = {
    CrossEntropyBackwardCpu, internal::CrossEntropyBackwardCuda};

}  // namespace

Tensor CrossEntropy(const Tensor& logits, const Tensor& targets,
                    int64_t ignore_index, LossReduction reduction) {
  CheckFloatingInputs("CrossEntropy", {logits});
  LC_REQUIRE(logits.dim() == 2, "CrossEntropy: logits have shape ",
             ShapeToString(logits.shape()), " (expected 2-D [N, C])");
  CheckIndexTensor("CrossEntropy", "targets", targets, logits.device());
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  LC_REQUIRE(classes > 0, "CrossEntropy: logits have shape ",
             ShapeToString(logits.shape()), " (expected at least 1 class)");
  LC_REQUIRE(targets.shape() == Shape{rows},
             "CrossEntropy: targets have shape ",
             ShapeToString(targets.shape()), " but logits have shape ",
             ShapeToString(logits.shape()), " (expected [", rows, "])");
  const std::optional<IndexAt> bad =
      FindInvalidIndex(targets, classes, ignore_index);
  LC_REQUIRE(!bad.has_value(), "CrossEntropy: target ", bad->value, " at row ",
             bad->position, " is out of range (expected 0 <= target < ",
             classes, " or ignore_index = ", ignore_index, ")");
  if (ComputesOnFloat32Copies(logits)) {
    return ComputeInFloat32(
        [&](const Tensor& logits32) {
          return CrossEntropy(logits32, targets, ignore_index, reduction);
        },
        logits);
  }
  const bool mean = reduction == LossReduction::kMean;
  const Device device = logits.device();
  const Tensor x = logits.detach().contiguous();
  const Tensor target = targets.to(device).contiguous();
  // The row count stays on the device: on CUDA the two passes queue without
  // a round trip (the target check above has already waited).
  const Tensor count = Empty({1}, DType::kInt64, device);
  // Saved in float64 on the CPU: the backward's exp(logit - lse) would
  // otherwise carry float32 rounding of lse times its magnitude.
  const Tensor lse = Empty({rows}, StatsDType(device, x.dtype()), device);
  Tensor loss = Empty({}, x.dtype(), device);
  kCrossEntropyForward.For(device)(x, target, ignore_index, mean, lse, count,
                                   loss);
  if (NeedsGrad({logits})) {
    RecordOp("CrossEntropy", {logits}, {&loss}, /*saved=*/{x, target},
             [x, target, lse, count, ignore_index,
              mean](const Tensors& g) -> Tensors {
               Tensor dx = Empty(x.shape(), x.dtype(), x.device());
               kCrossEntropyBackward.For(x.device())(
                   x, target, ignore_index, mean, lse, count, g[0], dx);
               return {dx};
             });
  }
  return loss;
}

}  // namespace lc
