// The CUDA kernel of ops/dropout.cc: applies the counter-based dropout mask
// (core/philox.h) to a float32, float64 or bfloat16 tensor of any strides,
// drawing exactly the CPU's mask.
#ifndef LONGCTX_OPS_DROPOUT_CUDA_H_
#define LONGCTX_OPS_DROPOUT_CUDA_H_

#include <cstdint>

#include "core/tensor.h"

namespace lc {
namespace internal {

// out[i] = PhiloxUniform(seed, offset, i) >= p ? in[i] / (1 - p) : 0 for
// every row-major index i of `in` (a CUDA tensor of any strides); out is
// contiguous, of in's shape and dtype, on in's device. The product is taken
// in float64 and rounded to float32 (then bfloat16 for bfloat16), which is
// what the CPU computes, so the outputs match the CPU's bit for bit (but for
// NaN inputs in bfloat16: CUDA's rounding gives 0x7fff, the CPU's 0x7fc0).
void DropoutCuda(const Tensor& in, uint64_t seed, uint64_t offset, double p,
                 const Tensor& out);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_DROPOUT_CUDA_H_
