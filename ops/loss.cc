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
double CrossEntropyForwardKernel(const T* logits, const int64_t* target,
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
void CrossEntropyBackwardKernel(const T* logits, const int64_t* target,
                                const double* lse, int64_t rows,
                                int64_t classes, int64_t ignore_index,
                                double scale, T* dlogits) {
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

// CrossEntropy on CUDA for validated logits [rows, classes] and targets.
Tensor CrossEntropyCuda(const Tensor& logits, const Tensor& targets,
                        int64_t ignore_index, LossReduction reduction) {
  const bool mean = reduction == LossReduction::kMean;
  const Device device = logits.device();
  const Tensor x = logits.detach().contiguous();
  const Tensor target = targets.to(device).contiguous();
  // The row count stays on the device: the two passes queue without a
  // round trip (the target check before them has already waited).
  const Tensor lse = Empty({x.size(0)}, ComputeDType(x.dtype()), device);
  const Tensor count = Empty({1}, DType::kInt64, device);
  Tensor loss = Empty({}, x.dtype(), device);
  internal::CrossEntropyForwardCuda(x, target, ignore_index, mean, lse, count,
                                    loss);
  if (NeedsGrad({logits})) {
    RecordOp("CrossEntropy", {logits}, {&loss}, /*saved=*/{x, target},
             [x, target, lse, count, ignore_index,
              mean](const Tensors& g) -> Tensors {
               Tensor dx = Empty(x.shape(), x.dtype(), x.device());
               internal::CrossEntropyBackwardCuda(x, target, ignore_index, mean,
                                                  lse, count, g[0], dx);
               return {dx};
             });
  }
  return loss;
}

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
  if (logits.device().is_cuda()) {
    return CrossEntropyCuda(logits, targets, ignore_index, reduction);
  }

  const Tensor target = targets.contiguous();
  const int64_t* target_data = target.data<int64_t>();
  const bool mean = reduction == LossReduction::kMean;
  // Only the mean needs the count of scored rows.
  const int64_t count =
      mean ? rows - std::count(target_data, target_data + rows, ignore_index)
           : 0;
  const Tensor x = logits.detach().contiguous();
  // Saved in float64: the backward's exp(logit - lse) would otherwise carry
  // float32 rounding of lse times its magnitude.
  const Tensor lse = Empty({rows}, DType::kFloat64);
  double total = 0;
  LC_DISPATCH_FLOATING(x.dtype(), "CrossEntropy", [&] {
    total =
        CrossEntropyForwardKernel(x.data<scalar_t>(), target_data, rows,
                                  classes, ignore_index, lse.data<double>());
  });
  // Ignored rows add 0 to `total`: with every row ignored the sum is 0.
  double value = total;
  if (mean) value = count > 0 ? total / count : 0.0;
  Tensor loss = Full({}, value, x.dtype());
  if (NeedsGrad({logits})) {
    RecordOp("CrossEntropy", {logits}, {&loss}, /*saved=*/{x, target},
             [x, target, lse, rows, classes, ignore_index, mean,
              count](const Tensors& g) -> Tensors {
               Tensor dx = Zeros(x.shape(), x.dtype());
               if (mean && count == 0) return {dx};
               const double scale = mean ? g[0].item() / count : g[0].item();
               LC_DISPATCH_FLOATING(x.dtype(), "CrossEntropy", [&] {
                 CrossEntropyBackwardKernel(
                     x.data<scalar_t>(), target.data<int64_t>(),
                     lse.data<double>(), rows, classes, ignore_index, scale,
                     dx.data<scalar_t>());
               });
               return {dx};
             });
  }
  return loss;
}

}  // namespace lc
