// Matrix multiplication of (batched) matrices: the GEMM behind Linear and the
// reference attention, with transposes taken as strided views, not copies.
// On the CPU through Eigen, on CUDA through cuBLAS (float64 in float64,
// float32 in float32 or TF32 when allowed, bfloat16 with float32
// accumulation).
#ifndef LONGCTX_OPS_MATMUL_H_
#define LONGCTX_OPS_MATMUL_H_

#include "core/tensor.h"

namespace lc {

// op(a) @ op(b): op(a) is a [..., m, k], or the transpose of a [..., k, m]
// when transpose_a; op(b) is b [..., k, n], or the transpose of b [..., n, k]
// when transpose_b. The batch dims (all but the last two) broadcast, so a 2-D
// operand is shared by every batch. Returns [batch..., m, n]. Both inputs need
// at least 2 dims and one floating dtype, on one device.
Tensor Matmul(const Tensor& a, const Tensor& b, bool transpose_a = false,
              bool transpose_b = false);

// Whether float32 GEMMs on CUDA may round their inputs to TF32 (a 10-bit
// mantissa) on the tensor cores: several times faster, with relative errors
// of about 1e-3 instead of 1e-6. Process-wide and false by default; float64
// and bfloat16 GEMMs and the CPU are unaffected. Safe to call from any
// thread; a GEMM reads the flag when it is issued.
void SetAllowTf32(bool allow);
bool AllowTf32();

}  // namespace lc

#endif  // LONGCTX_OPS_MATMUL_H_
