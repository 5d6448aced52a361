// How an op of ops/ picks its CPU or CUDA kernel: a table with one entry per
// device kind (the one place in ops/ that branches on the kind), the
// per-device properties ops share, and the CPU's bfloat16 rule. Internal to
// ops/.
#ifndef LONGCTX_OPS_DEVICE_KERNEL_H_
#define LONGCTX_OPS_DEVICE_KERNEL_H_

#include "core/device.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace lc {

// NOTE [ Op kernels ]
// An op family declares one signature per kernel, e.g. softmax's forward
//   using SoftmaxForwardKernel =
//       void(const Tensor& x, int64_t d, bool log, const Tensor& y);
// and implements it twice with exactly that signature: for the CPU in the
// op's .cc (SoftmaxForwardCpu) and for CUDA in <family>_cuda.h
// (internal::SoftmaxForwardCuda). A PerDevice table pairs the two,
//   constexpr PerDevice<SoftmaxForwardKernel*> kSoftmaxForward = {
//       SoftmaxForwardCpu, internal::SoftmaxForwardCuda};
// so the compiler checks that both devices' kernels take the same arguments,
// and the op's body is written once: validate the inputs, allocate the
// outputs on the inputs' device, run
//   kSoftmaxForward.For(x.device())(x, d, log, y);
// and record autograd (whose backward picks its kernel the same way).
// A difference between the devices that is not a kernel is an entry too: a
// family's table may hold a struct of its kernels and properties (matmul:
// which operand layouts the GEMM reads in place), and properties ops share
// have tables of their own below. PerDevice::For is the one place in ops/
// that branches on a device's kind.
template <typename T>
struct PerDevice {
  T cpu;
  T cuda;

  // The entry of `device`'s kind.
  const T& For(Device device) const { return device.is_cuda() ? cuda : cpu; }
};

// Whether a device's kernels take bfloat16 tensors: CUDA kernels compute
// bfloat16 in float32 registers, while on the CPU bfloat16 is a storage type
// only.
inline constexpr PerDevice<bool> kKernelsTakeBFloat16 = {/*cpu=*/false,
                                                         /*cuda=*/true};

// Whether an op given x computes on float32 copies of its inputs
// (ComputeInFloat32): x is bfloat16 and its device's kernels do not take
// bfloat16.
inline bool ComputesOnFloat32Copies(const Tensor& x) {
  return x.dtype() == DType::kBFloat16 && !kKernelsTakeBFloat16.For(x.device());
}

// Returns op(float32 copies of the inputs) converted back to bfloat16.
// Differentiable, since Tensor::to is. Typical use at the top of an op:
//   if (ComputesOnFloat32Copies(x)) return ComputeInFloat32(Exp, x);
template <typename Op, typename... Inputs>
Tensor ComputeInFloat32(const Op& op, const Inputs&... inputs) {
  return op(inputs.to(DType::kFloat32)...).to(DType::kBFloat16);
}

// Whether a device's kernels save per-row statistics for the backward (a
// norm's mean and rstd, cross-entropy's logsumexp) in float64 - the CPU, so
// that its backward has no float32 rounding of them - or in the compute type
// of the inputs (CUDA).
inline constexpr PerDevice<bool> kStatsInFloat64 = {/*cpu=*/true,
                                                    /*cuda=*/false};

// The dtype of those statistics for inputs of `dtype` on `device`.
inline DType StatsDType(Device device, DType dtype) {
  return kStatsInFloat64.For(device) ? DType::kFloat64 : ComputeDType(dtype);
}

}  // namespace lc

#endif  // LONGCTX_OPS_DEVICE_KERNEL_H_
