// The CUDA side of train/optimizer.h: AdamW, the gradients' sum of squares
// and their scaling, each over many float32 tensors of one device in one
// kernel launch per up to kTensorsPerLaunch tensors ("multi-tensor": the
// tensors' pointers and sizes travel as one launch argument, so no table is
// copied and nothing waits). Every kernel runs on CurrentCudaStream(device).
// The arithmetic is the CPU's, operation for operation in float64 without
// fused multiply-adds, so the results equal train/optimizer.cc's bit for bit
// up to the order of the sum of squares.
#ifndef LONGCTX_TRAIN_OPTIMIZER_CUDA_H_
#define LONGCTX_TRAIN_OPTIMIZER_CUDA_H_

#include <cstdint>
#include <vector>

namespace lc {

// One tensor of a multi-tensor launch: dense float32 buffers of `numel`
// elements on the device. The sum of squares and the scaling use only
// `grad`.
struct MultiTensorEntry {
  float* param = nullptr;
  float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  int64_t numel = 0;
  // AdamW: the parameter is first multiplied by it (1 - lr * weight_decay
  // for a decayed tensor, 1 otherwise).
  double decay = 1;
};

// The scalars of one AdamW step t (train/optimizer.h):
// step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t).
struct AdamWConstants {
  double beta1 = 0;
  double beta2 = 0;
  double eps = 0;
  double step_size = 0;
  double bias_correction2_sqrt = 0;
};

// The AdamW update of every entry (param, m, v updated in place, grad read),
// elementwise exactly as the CPU computes it.
void AdamWStepCuda(int device, const std::vector<MultiTensorEntry>& entries,
                   const AdamWConstants& constants);

// The float64 sum of grad[i]^2 over every entry, summed in a fixed order
// (bit-identical on every run); waits for the device.
double SumOfSquaresCuda(int device,
                        const std::vector<MultiTensorEntry>& entries);

// grad[i] = float(double(grad[i]) * factor) for every entry.
void ScaleCuda(int device, const std::vector<MultiTensorEntry>& entries,
               double factor);

}  // namespace lc

#endif  // LONGCTX_TRAIN_OPTIMIZER_CUDA_H_
