// The CPU attention driver: the tile loops of attention_kernel.h in float32
// or float64 (bfloat16 inputs are computed in float32), OpenMP over work
// units. See NOTE [ Attention drivers ].

#include <cstring>

#include "attention/attention_driver.h"
#include "core/check.h"

namespace lc {
namespace {

// fn(T{}) for T the C++ type of a CPU compute dtype: float or double.
template <typename Fn>
void DispatchCpu(DType dtype, Fn&& fn) {
  LC_CHECK(dtype == DType::kFloat32 || dtype == DType::kFloat64)
      << "the CPU driver computes float32 or float64, not " << DTypeName(dtype);
  if (dtype == DType::kFloat32) {
    fn(float{});
  } else {
    fn(double{});
  }
}

class CpuDriver final : public AttentionDriver {
 public:
  DType ComputeDType(DType dtype) const override {
    return dtype == DType::kBFloat16 ? DType::kFloat32 : dtype;
  }
  DType AccumulatorDType(DType dtype) const override {
    return ComputeDType(dtype);
  }
  DType DirectOutputDType(const AttentionProblem& p) const override {
    return AccumulatorDType(p.dtype);
  }

  void Prepare(const AttentionProblem&, const TokenLayout&,
               const TokenLayout&) const override {}

  void Forward(const AttentionProblem& p, const AttentionCall& call,
               const TokenLayout& ql, const Tensor& q, const TokenLayout& kl,
               const Tensor& k, const Tensor& v, const Tensor& out,
               const Tensor& lse) const override {
    const DType dtype = ComputeDType(p.dtype);
    CheckForwardBuffers(p, ql, kl, dtype, dtype, dtype, q, k, v, out, lse);
    DispatchCpu(dtype, [&](auto tag) {
      using T = decltype(tag);
      AttentionForwardTiles<T>(p, call, ql, q.data<T>(), kl, k.data<T>(),
                               v.data<T>(), out.data<T>(), lse.data<T>());
    });
  }

  void Backward(const AttentionProblem& p, const AttentionCall& call,
                const TokenLayout& ql, const Tensor& q, const TokenLayout& kl,
                const Tensor& k, const Tensor& v, const Tensor& grad_out,
                const Tensor& lse, const Tensor& delta, const Tensor& grad_lse,
                const Tensor& dq, const Tensor& dk,
                const Tensor& dv) const override {
    const DType dtype = ComputeDType(p.dtype);
    CheckBackwardBuffers(p, ql, kl, dtype, dtype, dtype, q, k, v, grad_out, lse,
                         delta, grad_lse, dq, dk, dv);
    DispatchCpu(dtype, [&](auto tag) {
      using T = decltype(tag);
      AttentionBackwardTiles<T>(p, call, ql, q.data<T>(), kl, k.data<T>(),
                                v.data<T>(), grad_out.data<T>(), lse.data<T>(),
                                delta.data<T>(), grad_lse.data<T>(),
                                dq.data<T>(), dk.data<T>(), dv.data<T>());
    });
  }

  void RowDelta(const AttentionProblem& p, const Tensor& out,
                const Tensor& grad_out, const Tensor& delta) const override {
    const DType dtype = ComputeDType(p.dtype);
    TokenLayout layout;
    layout.rows = out.size(1);
    CheckDriverBuffer(p, out, dtype, layout, false, "out");
    CheckDriverBuffer(p, grad_out, dtype, layout, false, "grad_out");
    CheckDriverBuffer(p, delta, dtype, layout, true, "delta");
    DispatchCpu(dtype, [&](auto tag) {
      using T = decltype(tag);
      lc::RowDelta<T>(p, layout.rows, out.data<T>(), grad_out.data<T>(),
                      delta.data<T>());
    });
  }

  void GatherRows(const Tensor& x, const Tensor& map,
                  const Tensor& out) const override {
    const int64_t batch = x.size(0), dim = x.size(-1);
    const int64_t from_rows = ChunkRowsPerBatch(x),
                  to_rows = ChunkRowsPerBatch(out);
    LC_CHECK_EQ(map.numel(), to_rows);
    const int64_t row_bytes = dim * DTypeSize(x.dtype());
    const auto* src = static_cast<const uint8_t*>(x.raw_data());
    auto* dst = static_cast<uint8_t*>(out.raw_data());
    const int64_t* index = map.data<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < to_rows; ++i) {
        std::memcpy(dst + (b * to_rows + i) * row_bytes,
                    src + (b * from_rows + index[i]) * row_bytes, row_bytes);
      }
    }
  }

  void AddRows(const Tensor& src, const Tensor& map,
               const Tensor& dst) const override {
    const int64_t batch = src.size(0), dim = src.size(-1);
    const int64_t src_rows = ChunkRowsPerBatch(src),
                  dst_rows = ChunkRowsPerBatch(dst);
    LC_CHECK_EQ(map.numel(), src_rows);
    const int64_t* index = map.data<int64_t>();
    DispatchCpu(src.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* s = src.data<T>();
      T* d = dst.data<T>();
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < src_rows; ++i) {
          const T* from = s + (b * src_rows + i) * dim;
          T* to = d + (b * dst_rows + index[i]) * dim;
          for (int64_t c = 0; c < dim; ++c) to[c] += from[c];
        }
      }
    });
  }
};

}  // namespace

const AttentionDriver& CpuAttentionDriver() {
  static const CpuDriver driver;
  return driver;
}

}  // namespace lc
