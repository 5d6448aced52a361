// Matrix multiplication of (batched) matrices: the GEMM behind Linear and the
// reference attention, with transposes taken as strided views, not copies.
#ifndef LONGCTX_OPS_MATMUL_H_
#define LONGCTX_OPS_MATMUL_H_

#include "core/tensor.h"

namespace lc {

// op(a) @ op(b): op(a) is a [..., m, k], or the transpose of a [..., k, m]
// when transpose_a; op(b) is b [..., k, n], or the transpose of b [..., n, k]
// when transpose_b. The batch dims (all but the last two) broadcast, so a 2-D
// operand is shared by every batch. Returns [batch..., m, n]. Both inputs need
// at least 2 dims and one floating dtype.
Tensor Matmul(const Tensor& a, const Tensor& b, bool transpose_a = false,
              bool transpose_b = false);

}  // namespace lc

#endif  // LONGCTX_OPS_MATMUL_H_
