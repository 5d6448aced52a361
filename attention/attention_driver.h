// The interface every attention kernel backend implements - forward,
// backward, the row delta, and the row moves the ring's chunks need - with
// one implementation per device: the CPU's tile loops (attention_kernel.h)
// and our CUDA kernels (attention_cuda.h). Attention and RingAttention are
// written once against it. Internal to attention/.
#ifndef LONGCTX_ATTENTION_ATTENTION_DRIVER_H_
#define LONGCTX_ATTENTION_ATTENTION_DRIVER_H_

#include "attention/attention_kernel.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace lc {

// NOTE [ Attention drivers ]
// A driver runs the partial-attention primitive over the tiles between one
// buffer of queries (a shared layout) and one of keys (either form of
// TokenLayout), merging into out/lse or adding into gradient accumulators,
// so that calls compose: the patterns of a head, the steps of a ring. All
// tensors are contiguous, on the problem's device; the inputs q, k, v (and
// out, grad_out) are of ComputeDType(p.dtype); out accumulators, lse,
// delta, grad_lse and gradient accumulators of AccumulatorDType(p.dtype) or,
// for a call that alone writes them, of DirectOutputDType(p). Results are
// bit-identical for equal inputs (the order of every sum is fixed by the
// plan). A CUDA driver queues its work on the current stream and never
// waits; it runs only tiles of layouts the plan prepared (Prepare), which is
// where all host planning and uploads happen.
class AttentionDriver {
 public:
  virtual ~AttentionDriver() = default;

  // The dtype the kernels read inputs of `dtype` in (the CPU computes
  // bfloat16 in float32).
  virtual DType ComputeDType(DType dtype) const = 0;
  // The dtype of out, lse and the gradient accumulators for inputs of
  // `dtype`.
  virtual DType AccumulatorDType(DType dtype) const = 0;
  // The dtype of out and the gradients when one call alone writes them:
  // CUDA writes bfloat16 rows once for one pattern per head (no float32
  // accumulators, no conversion), else the accumulator dtype.
  virtual DType DirectOutputDType(const AttentionProblem& p) const = 0;

  // Plans the tiles of ql x kl once for every later call (CUDA: builds and
  // uploads the work lists; the CPU plans as it goes).
  virtual void Prepare(const AttentionProblem& p, const TokenLayout& ql,
                       const TokenLayout& kl) const = 0;

  // Merges the attention of q's tokens over k's into out ([batch, q rows,
  // heads, head_dim]) and lse ([batch, heads, q rows]).
  virtual void Forward(const AttentionProblem& p, const AttentionCall& call,
                       const TokenLayout& ql, const Tensor& q,
                       const TokenLayout& kl, const Tensor& k, const Tensor& v,
                       const Tensor& out, const Tensor& lse) const = 0;

  // Adds the gradients of the pairs between q's tokens and k's into dq
  // (like q) and dk, dv (like k); delta is RowDelta's.
  virtual void Backward(const AttentionProblem& p, const AttentionCall& call,
                        const TokenLayout& ql, const Tensor& q,
                        const TokenLayout& kl, const Tensor& k, const Tensor& v,
                        const Tensor& grad_out, const Tensor& lse,
                        const Tensor& delta, const Tensor& grad_lse,
                        const Tensor& dq, const Tensor& dk,
                        const Tensor& dv) const = 0;

  // delta [batch, heads, rows] = sum over head_dim of out * grad_out
  // ([batch, rows, heads, head_dim]).
  virtual void RowDelta(const AttentionProblem& p, const Tensor& out,
                        const Tensor& grad_out, const Tensor& delta) const = 0;

  // Row moves between K/V chunk buffers, viewed as [batch, rows, head_dim]
  // (rows of head_dim elements): out[b, i] = x[b, map[i]] (GatherRows) and
  // dst[b, map[i]] += src[b, i] (AddRows, map's rows distinct); map is int64
  // on the device.
  virtual void GatherRows(const Tensor& x, const Tensor& map,
                          const Tensor& out) const = 0;
  virtual void AddRows(const Tensor& src, const Tensor& map,
                       const Tensor& dst) const = 0;
};

// The driver of `device`'s kind, and each by name.
const AttentionDriver& AttentionDriverFor(Device device);
const AttentionDriver& CpuAttentionDriver();
const AttentionDriver& CudaAttentionDriver();

// The shape of a driver buffer of `layout`: [batch, rows, heads, head_dim],
// or [batch, rows, head_dim] packed; with per_row, the statistics shape
// [batch, heads, rows] of a shared layout.
Shape DriverBufferShape(const AttentionProblem& p, const TokenLayout& layout,
                        bool per_row);

// Checks that t is a contiguous DriverBufferShape buffer of `dtype` on p's
// device: an internal invariant of the drivers' callers (LC_CHECK).
void CheckDriverBuffer(const AttentionProblem& p, const Tensor& t, DType dtype,
                       const TokenLayout& layout, bool per_row,
                       const char* what);

// Rows of head_dim elements per batch entry of a chunk buffer t ([batch,
// ..., head_dim]), as GatherRows and AddRows view it.
int64_t ChunkRowsPerBatch(const Tensor& t);

// The buffers of a Forward call (inputs of `input`, out of `output`, lse of
// `stat`) and of a Backward call (dq, dk, dv of `output`; lse, delta and
// grad_lse of `stat`), each checked with CheckDriverBuffer.
void CheckForwardBuffers(const AttentionProblem& p, const TokenLayout& ql,
                         const TokenLayout& kl, DType input, DType output,
                         DType stat, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& out, const Tensor& lse);
void CheckBackwardBuffers(const AttentionProblem& p, const TokenLayout& ql,
                          const TokenLayout& kl, DType input, DType output,
                          DType stat, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& grad_out,
                          const Tensor& lse, const Tensor& delta,
                          const Tensor& grad_lse, const Tensor& dq,
                          const Tensor& dk, const Tensor& dv);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_DRIVER_H_
