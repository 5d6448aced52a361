#include "attention/attention.h"

#include <limits>
#include <memory>
#include <vector>

#include "attention/attention_kernel.h"
#include "core/autograd.h"
#include "core/status.h"

namespace lc {

AttentionResult Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionPattern& pattern,
                          const AttentionOptions& options) {
  LC_REQUIRE(q.defined() && q.dim() == 4, "Attention: q has shape ",
             q.defined() ? ShapeToString(q.shape()) : "undefined",
             " (expected [batch, n, heads, head_dim])");
  if (q.dtype() == DType::kBFloat16 && k.defined() && v.defined() &&
      k.dtype() == q.dtype() && v.dtype() == q.dtype()) {
    AttentionResult r = Attention(q.to(DType::kFloat32), k.to(DType::kFloat32),
                                  v.to(DType::kFloat32), pattern, options);
    return {r.out.to(DType::kBFloat16), r.lse};
  }
  const int64_t n = q.size(1);
  std::shared_ptr<const AttentionProblem> p =
      MakeAttentionProblem(q, k, v, n, pattern, options);
  const TokenLayout all = TokenLayoutOf({PositionSpan{0, n}});

  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const DType dtype = q.dtype();
  Tensor out = Zeros(q.shape(), dtype);
  Tensor lse = Full({p->batch, p->heads, n},
                    -std::numeric_limits<double>::infinity(), dtype);
  if (dtype == DType::kFloat32) {
    AttentionForwardTiles<float>(*p, all, qc.data<float>(), all,
                                 kc.data<float>(), vc.data<float>(),
                                 out.data<float>(), lse.data<float>());
  } else {
    AttentionForwardTiles<double>(*p, all, qc.data<double>(), all,
                                  kc.data<double>(), vc.data<double>(),
                                  out.data<double>(), lse.data<double>());
  }
  if (NeedsGrad({qc, kc, vc})) {
    RecordOp(
        "Attention", {qc, kc, vc}, {&out, &lse},
        [p, all, q = qc.detach(), k = kc.detach(), v = vc.detach(),
         out = out.detach(), lse = lse.detach()](const Tensors& g) -> Tensors {
          const Tensor grad_out = g[0].contiguous();
          const Tensor grad_lse = g[1].contiguous();
          Tensor dq = ZerosLike(q), dk = ZerosLike(k), dv = ZerosLike(v);
          auto run = [&](auto tag) {
            using T = decltype(tag);
            std::vector<T> delta(p->batch * p->heads * p->n);
            RowDelta<T>(*p, p->n, out.data<T>(), grad_out.data<T>(),
                        delta.data());
            AttentionBackwardTiles<T>(
                *p, all, q.data<T>(), all, k.data<T>(), v.data<T>(),
                grad_out.data<T>(), lse.data<T>(), delta.data(),
                grad_lse.data<T>(), dq.data<T>(), dk.data<T>(), dv.data<T>());
          };
          if (q.dtype() == DType::kFloat32) {
            run(float{});
          } else {
            run(double{});
          }
          return {dq, dk, dv};
        });
  }
  return {out, lse};
}

}  // namespace lc
