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

}  // namespace lc
