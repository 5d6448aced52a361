#include "attention/attention_driver.h"

#include "core/check.h"

namespace lc {

const AttentionDriver& AttentionDriverFor(Device device) {
  return device.is_cuda() ? CudaAttentionDriver() : CpuAttentionDriver();
}

Shape DriverBufferShape(const AttentionProblem& p, const TokenLayout& layout,
                        bool per_row) {
  if (per_row) return {p.batch, p.heads, layout.rows};
  if (layout.packed()) return {p.batch, layout.rows, p.head_dim};
  return {p.batch, layout.rows, p.heads, p.head_dim};
}

void CheckDriverBuffer(const AttentionProblem& p, const Tensor& t, DType dtype,
                       const TokenLayout& layout, bool per_row,
                       const char* what) {
  const Shape expected = DriverBufferShape(p, layout, per_row);
  LC_CHECK(t.defined() && t.device() == p.device && t.dtype() == dtype &&
           t.shape() == expected && t.is_contiguous())
      << what << ": " << (t.defined() ? t.ToString() : "undefined")
      << " (expected contiguous " << DTypeName(dtype) << " "
      << ShapeToString(expected) << " on " << p.device.ToString() << ")";
}

int64_t ChunkRowsPerBatch(const Tensor& t) {
  return t.numel() / (t.size(0) * t.size(-1));
}

void CheckForwardBuffers(const AttentionProblem& p, const TokenLayout& ql,
                         const TokenLayout& kl, DType input, DType output,
                         DType stat, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& out,
                         const Tensor& lse) {
  CheckDriverBuffer(p, q, input, ql, false, "q");
  CheckDriverBuffer(p, k, input, kl, false, "k");
  CheckDriverBuffer(p, v, input, kl, false, "v");
  CheckDriverBuffer(p, out, output, ql, false, "out");
  CheckDriverBuffer(p, lse, stat, ql, true, "lse");
}

void CheckBackwardBuffers(const AttentionProblem& p, const TokenLayout& ql,
                          const TokenLayout& kl, DType input, DType output,
                          DType stat, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& grad_out,
                          const Tensor& lse, const Tensor& delta,
                          const Tensor& grad_lse, const Tensor& dq,
                          const Tensor& dk, const Tensor& dv) {
  CheckDriverBuffer(p, q, input, ql, false, "q");
  CheckDriverBuffer(p, k, input, kl, false, "k");
  CheckDriverBuffer(p, v, input, kl, false, "v");
  CheckDriverBuffer(p, grad_out, input, ql, false, "grad_out");
  CheckDriverBuffer(p, lse, stat, ql, true, "lse");
  CheckDriverBuffer(p, delta, stat, ql, true, "delta");
  CheckDriverBuffer(p, grad_lse, stat, ql, true, "grad_lse");
  CheckDriverBuffer(p, dq, output, ql, false, "dq");
  CheckDriverBuffer(p, dk, output, kl, false, "dk");
  CheckDriverBuffer(p, dv, output, kl, false, "dv");
}

}  // namespace lc
