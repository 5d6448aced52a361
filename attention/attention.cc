#include "attention/attention.h"

#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "attention/attention_cudnn.h"
#include "attention/attention_kernel.h"
#include "attention/partial_attention.h"
#include "core/autograd.h"
#include "core/status.h"

namespace lc {
namespace {

// The dtype the CUDA drivers write out and the gradients in: bfloat16
// directly for bfloat16 inputs with one pattern per head (each row written
// once: no float32 accumulators, no conversion), else the accumulator dtype.
DType CudaOutputDType(const AttentionProblem& p, DType dtype) {
  return dtype == DType::kBFloat16 && p.max_patterns == 1
             ? dtype
             : CudaAccumulatorDType(dtype);
}

// The cuDNN launches of problem p under `options`: none for kOwn or
// for a call cuDNN cannot run under kAuto; an error naming why for kCudnn.
std::optional<std::vector<CudnnAttentionLaunch>> CudnnLaunchesFor(
    const AttentionProblem& p, const Tensor& q,
    const AttentionOptions& options) {
  const AttentionBackend backend = options.backend;
  if (backend == AttentionBackend::kOwn) return std::nullopt;
  absl::StatusOr<std::vector<CudnnAttentionLaunch>> launches =
      CudnnAttentionLaunches(p, q.dtype(), q.device().index);
  if (launches.ok()) return *std::move(launches);
  if (backend == AttentionBackend::kCudnn) ThrowIfError(launches.status());
  return std::nullopt;
}

// A cuDNN status under `backend`: true when cuDNN ran, false when kAuto
// should run ours instead (cuDNN has no engine, or its workspace does not
// fit: ours needs none); throws otherwise.
bool RanOnCudnn(const absl::Status& status, AttentionBackend backend) {
  if (status.ok()) return true;
  if (backend == AttentionBackend::kAuto &&
      (absl::IsUnimplemented(status) || absl::IsResourceExhausted(status))) {
    return false;
  }
  ThrowIfError(status);
  return false;
}

// Attention on a CUDA device: cuDNN's fused attention or our kernels
// (options.backend). Ours compute bfloat16 natively (float32 arithmetic;
// with several patterns per head, float32 accumulators converted at the
// end), float32 and float64 in their own precision. out has q's dtype, lse
// the accumulator dtype (float32, float64 for float64 inputs).
AttentionResult AttentionCuda(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionPattern& pattern,
                              const AttentionOptions& options) {
  const int64_t n = q.size(1);
  std::shared_ptr<const AttentionProblem> p =
      MakeAttentionProblem(q, k, v, n, pattern, options);
  const TokenLayout all = TokenLayoutOf({PositionSpan{0, n}});
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const Device device = q.device();
  const DType dtype = q.dtype();
  const DType acc = CudaAccumulatorDType(dtype);
  const DType written = CudaOutputDType(*p, dtype);
  const AttentionBackend backend = options.backend;
  const std::optional<std::vector<CudnnAttentionLaunch>> cudnn =
      CudnnLaunchesFor(*p, q, options);
  auto fresh_out = [&] { return Zeros(q.shape(), written, device); };
  auto fresh_lse = [&] {
    return Full({p->batch, p->heads, n},
                -std::numeric_limits<double>::infinity(), acc, device);
  };
  Tensor out = fresh_out(), lse = fresh_lse();
  const bool on_cudnn =
      cudnn.has_value() &&
      RanOnCudnn(CudnnAttentionForward(*cudnn, qc, kc, vc, out, lse), backend);
  if (!on_cudnn) {
    if (cudnn.has_value()) out = fresh_out(), lse = fresh_lse();
    AttentionForwardTilesCuda(*p, all, qc, all, kc, vc, out, lse);
  }
  if (written != dtype) out = out.to(dtype);
  if (NeedsGrad({qc, kc, vc})) {
    RecordOp(
        "Attention", {qc, kc, vc}, {&out, &lse},
        /*saved=*/{qc, kc, vc, out, lse},
        [p, all, backend, deterministic = options.deterministic,
         cudnn = on_cudnn ? cudnn : std::nullopt, q = qc.detach(),
         k = kc.detach(), v = vc.detach(), out = out.detach(),
         lse = lse.detach()](const Tensors& g) -> Tensors {
          const Tensor grad_out =
              g[0].defined() ? g[0].contiguous() : ZerosLike(out);
          const Device device = q.device();
          const DType dtype = q.dtype();
          const DType acc = CudaAccumulatorDType(dtype);
          const DType written = CudaOutputDType(*p, dtype);
          // Rows no pair reaches keep these zeros.
          auto zeros = [&](const Tensor& like) {
            return Zeros(like.shape(), written, device);
          };
          const bool cudnn_backward =
              cudnn.has_value() && !g[1].defined() && !deterministic;
          if (cudnn_backward) {
            Tensor dq = zeros(q), dk = zeros(k), dv = zeros(v);
            if (RanOnCudnn(CudnnAttentionBackward(*cudnn, q, k, v, out,
                                                  grad_out, lse, dq, dk, dv),
                           backend)) {
              return {dq, dk, dv};
            }
          }  // (a failed cuDNN call may have written rows: ours starts over)
          // (kCudnn with deterministic was refused before the forward.)
          LC_REQUIRE(backend != AttentionBackend::kCudnn || cudnn_backward,
                     "Attention: backend kCudnn has no backward that takes a "
                     "gradient through lse (use kAuto or kOwn)");
          const Tensor grad_lse =
              g[1].defined() ? g[1].contiguous() : ZerosLike(lse);
          Tensor dq = zeros(q), dk = zeros(k), dv = zeros(v);
          Tensor delta = Empty({p->batch, p->heads, p->n}, acc, device);
          RowDeltaCuda(*p, p->n, out, grad_out, delta);
          AttentionBackwardTilesCuda(*p, all, q, all, k, v, grad_out, lse,
                                     delta, grad_lse, dq, dk, dv);
          if (written == dtype) return {dq, dk, dv};
          delta = Tensor();  // freed before the conversions allocate
          return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
        },
        MissingGrad::kUndefined);
  }
  return {out, lse};
}

}  // namespace

AttentionResult Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionPattern& pattern,
                          const AttentionOptions& options) {
  // Refused before any work: the forward would run only for the backward to
  // fail (cuDNN's backward adds dq with atomics, and kCudnn runs no other).
  LC_REQUIRE(
      options.backend != AttentionBackend::kCudnn || !options.deterministic,
      "Attention: backend kCudnn with deterministic (cuDNN's backward is not "
      "deterministic; expected backend kAuto or kOwn, or deterministic false)");
  LC_REQUIRE(q.defined() && q.dim() == 4, "Attention: q has shape ",
             q.defined() ? ShapeToString(q.shape()) : "undefined",
             " (expected [batch, n, heads, head_dim])");
  const int64_t n = q.size(1);
  if (q.device().is_cuda()) return AttentionCuda(q, k, v, pattern, options);
  if (q.dtype() == DType::kBFloat16 && k.defined() && v.defined() &&
      k.dtype() == q.dtype() && v.dtype() == q.dtype()) {
    AttentionResult r = Attention(q.to(DType::kFloat32), k.to(DType::kFloat32),
                                  v.to(DType::kFloat32), pattern, options);
    return {r.out.to(DType::kBFloat16), r.lse};
  }
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
        /*saved=*/{qc, kc, vc, out, lse},
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
