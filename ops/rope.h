// Rotary position embedding (RoPE) for attention queries and keys, with the
// half-split pairing of HF LLaMA's rotate_half.
#ifndef LONGCTX_OPS_ROPE_H_
#define LONGCTX_OPS_ROPE_H_

#include "core/tensor.h"

namespace lc {

// Rotates x [batch, n, heads, head_dim] (head_dim even) by position: with
// h = head_dim / 2, angle[t, i] = positions[t] * base^(-2i / head_dim) and
// pairs (x_i, x_{i+h}) for i < h,
//   out_i     = x_i * cos(angle) - x_{i+h} * sin(angle),
//   out_{i+h} = x_{i+h} * cos(angle) + x_i * sin(angle).
// positions (int64 [n]) are explicit so that a rank holding a slice of the
// sequence passes its global positions. Angles and their cos/sin are computed
// in float64, the rotation in x's compute type. Returns [batch, n, heads,
// head_dim]. On CUDA, positions may be on x's device (preferred: no copy) or
// on the CPU (copied to the device on every call, which waits for the copy);
// head_dim is at most 4096 there.
Tensor ApplyRotary(const Tensor& x, const Tensor& positions,
                   double base = 10000.0);

}  // namespace lc

#endif  // LONGCTX_OPS_ROPE_H_
