// The CUDA attention driver: our fused kernels (attention_cuda.h) over the
// work lists the plan uploaded (attention_cuda_plan.h), bfloat16 computed
// natively on tensor cores, float32 and float64 in their own precision;
// the ring's row moves are the gather kernels of ops/shape_ops_cuda.h. See
// NOTE [ Attention drivers ].

#include "attention/attention_cuda.h"
#include "attention/attention_cuda_plan.h"
#include "attention/attention_driver.h"
#include "core/check.h"
#include "ops/shape_ops_cuda.h"

namespace lc {
namespace {

class CudaDriver final : public AttentionDriver {
 public:
  DType ComputeDType(DType dtype) const override { return dtype; }
  DType AccumulatorDType(DType dtype) const override {
    return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  }
  DType DirectOutputDType(const AttentionProblem& p) const override {
    return p.dtype == DType::kBFloat16 && p.max_patterns == 1
               ? p.dtype
               : AccumulatorDType(p.dtype);
  }

  void Prepare(const AttentionProblem& p, const TokenLayout& ql,
               const TokenLayout& kl) const override {
    LC_CHECK(p.cuda_work_lists != nullptr) << "a CUDA driver on a CPU problem";
    if (ql.rows > 0 && kl.rows > 0) p.cuda_work_lists->Prepare(p, ql, kl);
  }

  void Forward(const AttentionProblem& p, const AttentionCall& call,
               const TokenLayout& ql, const Tensor& q, const TokenLayout& kl,
               const Tensor& k, const Tensor& v, const Tensor& out,
               const Tensor& lse) const override {
    const DType out_dtype = OutputDType(p, out);
    CheckForwardBuffers(p, ql, kl, p.dtype, out_dtype,
                        AccumulatorDType(p.dtype), q, k, v, out, lse);
    if (ql.rows == 0 || kl.rows == 0) return;
    const CudaWorkList& queries =
        p.cuda_work_lists->Get(ql, kl, CudaWorkKind::kQueryItems);
    LaunchAttentionForward(ArgsOf(p, call, ql, kl, out_dtype), queries,
                           q.raw_data(), k.raw_data(), v.raw_data(),
                           out.raw_data(), lse.raw_data());
  }

  void Backward(const AttentionProblem& p, const AttentionCall& call,
                const TokenLayout& ql, const Tensor& q, const TokenLayout& kl,
                const Tensor& k, const Tensor& v, const Tensor& grad_out,
                const Tensor& lse, const Tensor& delta, const Tensor& grad_lse,
                const Tensor& dq, const Tensor& dk,
                const Tensor& dv) const override {
    const DType out_dtype = OutputDType(p, dq);
    CheckBackwardBuffers(p, ql, kl, p.dtype, out_dtype,
                         AccumulatorDType(p.dtype), q, k, v, grad_out, lse,
                         delta, grad_lse, dq, dk, dv);
    if (ql.rows == 0 || kl.rows == 0) return;
    const CudaWorkList& queries =
        p.cuda_work_lists->Get(ql, kl, CudaWorkKind::kQueryItems);
    const CudaWorkList& keys =
        p.cuda_work_lists->Get(ql, kl, CudaWorkKind::kKeyItems);
    LaunchAttentionBackward(ArgsOf(p, call, ql, kl, out_dtype), queries, keys,
                            q.raw_data(), k.raw_data(), v.raw_data(),
                            grad_out.raw_data(), lse.raw_data(),
                            delta.raw_data(), grad_lse.raw_data(),
                            dq.raw_data(), dk.raw_data(), dv.raw_data());
  }

  void RowDelta(const AttentionProblem& p, const Tensor& out,
                const Tensor& grad_out, const Tensor& delta) const override {
    TokenLayout layout;
    layout.rows = out.size(1);
    CheckDriverBuffer(p, out, p.dtype, layout, false, "out");
    CheckDriverBuffer(p, grad_out, p.dtype, layout, false, "grad_out");
    CheckDriverBuffer(p, delta, AccumulatorDType(p.dtype), layout, true,
                      "delta");
    LaunchRowDelta(p.dtype, p.device.index, p.batch, layout.rows, p.heads,
                   p.head_dim, out.raw_data(), grad_out.raw_data(),
                   delta.raw_data());
  }

  void GatherRows(const Tensor& x, const Tensor& map,
                  const Tensor& out) const override {
    internal::GatherRowsCuda(x, map, x.size(0), ChunkRowsPerBatch(x),
                             x.size(-1), out);
  }

  // The rows scattered into a buffer like dst (each of src's rows goes to a
  // distinct row, the others zero), then added.
  void AddRows(const Tensor& src, const Tensor& map,
               const Tensor& dst) const override {
    const Tensor spread = Empty(dst.shape(), dst.dtype(), dst.device());
    internal::IndexAddRowsCuda(src, map, src.size(0), ChunkRowsPerBatch(dst),
                               src.size(-1), spread);
    AddInPlace(dst, spread);
  }

 private:
  // The dtype of the outputs (out, or dq, dk, dv): the accumulator dtype,
  // or bfloat16 written once (CudaAttentionArgs::out_dtype) when `out` is
  // bfloat16.
  DType OutputDType(const AttentionProblem& p, const Tensor& out) const {
    if (p.dtype == DType::kBFloat16 && out.defined() &&
        out.dtype() == DType::kBFloat16) {
      LC_CHECK_EQ(p.max_patterns, 1)
          << "bfloat16 outputs are written once: one pattern per head";
      return DType::kBFloat16;
    }
    return AccumulatorDType(p.dtype);
  }

  static CudaAttentionArgs ArgsOf(const AttentionProblem& p,
                                  const AttentionCall& call,
                                  const TokenLayout& ql, const TokenLayout& kl,
                                  DType out_dtype) {
    CudaAttentionArgs args;
    args.dtype = p.dtype;
    args.out_dtype = out_dtype;
    args.device = p.device.index;
    args.batch = p.batch;
    args.n = p.n;
    args.heads = p.heads;
    args.head_dim = p.head_dim;
    LC_CHECK(!ql.packed()) << "queries come in a shared layout";
    args.q_rows = ql.rows;
    args.q_batch_stride = ql.rows * p.heads * p.head_dim;
    args.q_row_stride = p.heads * p.head_dim;
    args.k_batch_stride = kl.rows * kl.RowStride(p.heads, p.head_dim);
    args.k_row_stride = kl.RowStride(p.heads, p.head_dim);
    args.k_head_stride = kl.packed() ? 0 : p.head_dim;
    args.max_patterns = p.max_patterns;
    args.scale = p.scale;
    args.causal = p.plan.causal;
    args.key_padding =
        call.key_padding.defined() ? call.key_padding.data<uint8_t>() : nullptr;
    args.dropout = p.dropout;
    args.dropout_seed = call.dropout_seed;
    args.dropout_offset = call.dropout_offset;
    return args;
  }
};

}  // namespace

const AttentionDriver& CudaAttentionDriver() {
  static const CudaDriver driver;
  return driver;
}

}  // namespace lc
