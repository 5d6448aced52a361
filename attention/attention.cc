#include "attention/attention.h"

#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "attention/attention_cudnn.h"
#include "attention/attention_driver.h"
#include "attention/attention_kernel.h"
#include "attention/attention_plan.h"
#include "core/autograd.h"
#include "core/status.h"

namespace lc {
namespace {

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

// One-rank attention: every token's queries against every token's keys, on
// the driver of the inputs' device, or on cuDNN's fused attention where
// options.backend allows and cuDNN runs the pattern (chosen when the plan
// is made).
class OneRankPlan final : public AttentionPlan {
 public:
  OneRankPlan(const TensorSpec& inputs, const AttentionPattern& pattern,
              const AttentionOptions& options)
      : inputs_(inputs),
        driver_(AttentionDriverFor(inputs.device)),
        backend_(options.backend),
        deterministic_(options.deterministic) {
    // Refused before any work: the forward would run only for the backward
    // to fail (cuDNN's backward adds dq with atomics, and kCudnn runs no
    // other).
    LC_REQUIRE(
        options.backend != AttentionBackend::kCudnn || !options.deterministic,
        "Attention: backend kCudnn with deterministic (cuDNN's "
        "backward is not deterministic; expected backend kAuto or "
        "kOwn, or deterministic false)");
    std::shared_ptr<AttentionProblem> p =
        MakeAttentionProblem(inputs, inputs.shape[1], pattern, options);
    all_ = TokenLayoutOf({PositionSpan{0, p->n}});
    driver_.Prepare(*p, all_, all_);
    if (inputs.device.is_cuda() && backend_ != AttentionBackend::kOwn) {
      absl::StatusOr<std::vector<CudnnAttentionLaunch>> launches =
          CudnnAttentionLaunches(*p);
      if (launches.ok()) {
        cudnn_ = *std::move(launches);
      } else if (backend_ == AttentionBackend::kCudnn) {
        ThrowIfError(launches.status());
      }
    }
    p_ = std::move(p);
  }

  const TensorSpec& inputs() const override { return inputs_; }

  AttentionResult Run(const Tensor& q, const Tensor& k, const Tensor& v,
                      const AttentionCallOptions& options) const override {
    const AttentionProblem& p = *p_;
    CheckAttentionInputs("Attention", inputs_, q, k, v);
    const AttentionCall call = MakeAttentionCall("Attention", p, options);
    // cuDNN takes no key padding mask: such a call runs on ours.
    const bool padded = call.key_padding.defined();
    LC_REQUIRE(!padded || backend_ != AttentionBackend::kCudnn,
               "Attention: ", kCudnnNoPaddingMask,
               " (use backend kAuto or kOwn)");
    const std::optional<std::vector<CudnnAttentionLaunch>> cudnn =
        padded ? std::nullopt : cudnn_;

    const DType compute = driver_.ComputeDType(p.dtype);
    const DType acc = driver_.AccumulatorDType(p.dtype);
    const DType written = driver_.DirectOutputDType(p);
    // (bfloat16 on the CPU: converted here, differentiably.)
    const Tensor qc = q.to(compute).contiguous();
    const Tensor kc = k.to(compute).contiguous();
    const Tensor vc = v.to(compute).contiguous();
    const Shape shape = qc.shape();
    auto fresh_out = [&] { return Zeros(shape, written, p.device); };
    auto fresh_lse = [&] {
      return Full({p.batch, p.heads, p.n},
                  -std::numeric_limits<double>::infinity(), acc, p.device);
    };
    Tensor out = fresh_out(), lse = fresh_lse();
    const bool on_cudnn =
        cudnn.has_value() &&
        RanOnCudnn(CudnnAttentionForward(*cudnn, qc, kc, vc, out, lse),
                   backend_);
    if (!on_cudnn) {
      // (a failed cuDNN call may have written rows: ours starts over)
      if (cudnn.has_value()) out = fresh_out(), lse = fresh_lse();
      driver_.Forward(p, call, all_, qc, all_, kc, vc, out, lse);
    }
    if (written != compute) out = out.to(compute);
    if (NeedsGrad({qc, kc, vc})) {
      RecordOp(
          "Attention", {qc, kc, vc}, {&out, &lse},
          /*saved=*/{qc, kc, vc, out, lse},
          [p = p_, &driver = driver_, all = all_, call, backend = backend_,
           deterministic = deterministic_,
           cudnn = on_cudnn ? cudnn : std::nullopt, q = qc.detach(),
           k = kc.detach(), v = vc.detach(), out = out.detach(),
           lse = lse.detach()](const Tensors& g) -> Tensors {
            return Backward(*p, driver, all, call, backend, deterministic,
                            cudnn, q, k, v, out, lse, g);
          },
          MissingGrad::kUndefined);
    }
    if (compute != p.dtype) out = out.to(p.dtype);
    return {out, lse};
  }

 private:
  // The gradients of q, k, v from g = {grad of out, grad of lse} (either
  // may be undefined), on cuDNN when its forward ran there, no gradient
  // comes through lse and the call need not be deterministic, else on the
  // driver.
  static Tensors Backward(
      const AttentionProblem& p, const AttentionDriver& driver,
      const TokenLayout& all, const AttentionCall& call,
      AttentionBackend backend, bool deterministic,
      const std::optional<std::vector<CudnnAttentionLaunch>>& cudnn,
      const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
      const Tensor& lse, const Tensors& g) {
    const Tensor grad_out = g[0].defined() ? g[0].contiguous() : ZerosLike(out);
    const DType written = driver.DirectOutputDType(p);
    // Rows no pair reaches keep these zeros.
    auto zeros = [&](const Tensor& like) {
      return Zeros(like.shape(), written, p.device);
    };
    const bool cudnn_backward =
        cudnn.has_value() && !g[1].defined() && !deterministic;
    if (cudnn_backward) {
      Tensor dq = zeros(q), dk = zeros(k), dv = zeros(v);
      if (RanOnCudnn(CudnnAttentionBackward(*cudnn, q, k, v, out, grad_out, lse,
                                            dq, dk, dv),
                     backend)) {
        return {dq, dk, dv};
      }
    }  // (a failed cuDNN call may have written rows: ours starts over)
    // (kCudnn with deterministic was refused when the plan was made.)
    LC_REQUIRE(backend != AttentionBackend::kCudnn || cudnn_backward,
               "Attention: backend kCudnn has no backward that takes a "
               "gradient through lse (use kAuto or kOwn)");
    const Tensor grad_lse = g[1].defined() ? g[1].contiguous() : ZerosLike(lse);
    Tensor dq = zeros(q), dk = zeros(k), dv = zeros(v);
    Tensor delta = Empty({p.batch, p.heads, p.n},
                         driver.AccumulatorDType(p.dtype), p.device);
    driver.RowDelta(p, out, grad_out, delta);
    driver.Backward(p, call, all, q, all, k, v, grad_out, lse, delta, grad_lse,
                    dq, dk, dv);
    if (written == q.dtype()) return {dq, dk, dv};
    delta = Tensor();  // freed before the conversions allocate
    return {dq.to(q.dtype()), dk.to(q.dtype()), dv.to(q.dtype())};
  }

  const TensorSpec inputs_;
  const AttentionDriver& driver_;
  const AttentionBackend backend_;
  const bool deterministic_;
  std::shared_ptr<const AttentionProblem> p_;
  TokenLayout all_;  // every token, in order
  std::optional<std::vector<CudnnAttentionLaunch>> cudnn_;  // cuDNN runs it
};

}  // namespace

TensorSpec SpecOf(const Tensor& t) {
  LC_REQUIRE(t.defined(), "attention: an undefined input tensor");
  return TensorSpec{t.shape(), t.dtype(), t.device()};
}

std::shared_ptr<const AttentionPlan> MakeAttentionPlan(
    const TensorSpec& inputs, const AttentionPattern& pattern,
    const AttentionOptions& options) {
  return std::make_shared<const OneRankPlan>(inputs, pattern, options);
}

AttentionResult Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionPattern& pattern,
                          const AttentionOptions& options,
                          const AttentionCallOptions& call) {
  LC_REQUIRE(q.defined() && q.dim() == 4, "Attention: q has shape ",
             q.defined() ? ShapeToString(q.shape()) : "undefined",
             " (expected [batch, n, heads, head_dim])");
  // The inputs agree before a plan allocates anything for q's device.
  CheckAttentionInputs("Attention", SpecOf(q), q, k, v);
  return MakeAttentionPlan(SpecOf(q), pattern, options)->Run(q, k, v, call);
}

}  // namespace lc
