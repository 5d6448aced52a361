#include "attention/multihead_attention.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "ops/rope.h"
#include "ops/shape_ops.h"

namespace lc {
namespace {

// Redraws a projection's weight from N(0, gain^2 * 2 / (fan_in + fan_out))
// (Xavier normal) and zeroes its bias.
void XavierNormal(const nn::Linear& linear, double gain, Generator& gen) {
  NoGradGuard no_grad;
  const Tensor& w = linear.weight();
  const double std =
      gain * std::sqrt(2.0 / static_cast<double>(w.size(0) + w.size(1)));
  std::vector<double> values =
      Randn(w.shape(), gen, DType::kFloat64).ToVector();
  for (double& x : values) x *= std;
  CopyInto(w, FromVector(values, w.shape(), DType::kFloat64));
  if (linear.bias().defined())
    CopyInto(linear.bias(), ZerosLike(linear.bias()));
}

}  // namespace

absl::Status ValidateMultiheadAttentionOptions(
    const MultiheadAttentionOptions& options) {
  if (options.embed_dim < 1 || options.num_heads < 1 ||
      options.embed_dim % options.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "embed_dim ", options.embed_dim, " and num_heads ", options.num_heads,
        " (expected both >= 1 and num_heads dividing embed_dim)"));
  }
  // The fused projection's weight has 3 embed_dim^2 elements, which must
  // fit in int64 (any such weight is far past memory anyway).
  if (options.embed_dim >
      std::numeric_limits<int64_t>::max() / 3 / options.embed_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "embed_dim ", options.embed_dim,
        " (expected 3 * embed_dim^2, the [3 * embed_dim, embed_dim] "
        "projection's size, below 2^63)"));
  }
  if (!(options.init_gain > 0) || !std::isfinite(options.init_gain)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "init_gain ", options.init_gain, " (expected a finite number > 0)"));
  }
  if (!(options.rope_base > 0) || !std::isfinite(options.rope_base)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rope_base ", options.rope_base, " (expected a finite number > 0)"));
  }
  if (!IsFloating(options.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype ", DTypeName(options.dtype),
                     " (expected float32, float64 or bfloat16)"));
  }
  return ValidateAttentionConfig(options.attention);
}

MultiheadDilatedAttention::MultiheadDilatedAttention(
    const MultiheadAttentionOptions& options, Generator& gen)
    : options_(options) {
  ThrowIfError(ValidateMultiheadAttentionOptions(options));
  const int64_t e = options.embed_dim;
  const DType dt = options.dtype;
  if (options.fused_qkv) {
    qkv_proj_ = RegisterModule(
        "qkv_proj",
        std::make_shared<nn::Linear>(e, 3 * e, options.bias, gen, dt));
    XavierNormal(*qkv_proj_, 1.0, gen);
  } else {
    q_proj_ = RegisterModule(
        "q_proj", std::make_shared<nn::Linear>(e, e, options.bias, gen, dt));
    k_proj_ = RegisterModule(
        "k_proj", std::make_shared<nn::Linear>(e, e, options.bias, gen, dt));
    v_proj_ = RegisterModule(
        "v_proj", std::make_shared<nn::Linear>(e, e, options.bias, gen, dt));
    XavierNormal(*q_proj_, 1.0, gen);
    XavierNormal(*k_proj_, 1.0, gen);
    XavierNormal(*v_proj_, options.init_gain, gen);
  }
  if (options.sub_layer_norm) {
    sub_norm_ = RegisterModule(
        "sub_norm", std::make_shared<nn::LayerNorm>(e, 1e-5, true, dt));
  }
  out_proj_ = RegisterModule(
      "out_proj", std::make_shared<nn::Linear>(e, e, options.bias, gen, dt));
  XavierNormal(*out_proj_, options.init_gain, gen);
}

Tensor MultiheadDilatedAttention::Forward(const Tensor& x,
                                          const Tensor& key_padding_mask,
                                          const SequenceParallelContext* sp,
                                          const Tensor& positions) const {
  const int64_t e = options_.embed_dim, h = options_.num_heads;
  LC_REQUIRE(x.defined() && x.dim() == 3 && x.size(2) == e,
             "MultiheadDilatedAttention: input of shape ",
             x.defined() ? ShapeToString(x.shape()) : "undefined",
             " (expected [batch, n, ", e, "])");
  const int64_t b = x.size(0), n = x.size(1);
  Tensor q, k, v;
  if (qkv_proj_ != nullptr) {
    std::vector<Tensor> parts = Split(qkv_proj_->Forward(x), {e, e, e}, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    q = q_proj_->Forward(x);
    k = k_proj_->Forward(x);
    v = v_proj_->Forward(x);
  }
  const Shape heads_shape = {b, n, h, e / h};
  q = q.reshape(heads_shape);
  k = k.reshape(heads_shape);
  if (positions.defined()) {
    CheckIndexTensor("MultiheadDilatedAttention", "positions", positions,
                     x.device());
    LC_REQUIRE(positions.dim() == 1 && positions.size(0) == n,
               "MultiheadDilatedAttention: positions of shape ",
               ShapeToString(positions.shape()), " (expected [", n, "])");
    LC_REQUIRE((e / h) % 2 == 0, "MultiheadDilatedAttention: head_dim ", e / h,
               " (rotary positions need an even head_dim)");
    q = ApplyRotary(q, positions, options_.rope_base);
    k = ApplyRotary(k, positions, options_.rope_base);
  }
  AttentionCallOptions call;
  call.generator = &DefaultGenerator();
  call.key_padding_mask = key_padding_mask;
  const AttentionResult r =
      PlanFor(SpecOf(q), sp)->Run(q, k, v.reshape(heads_shape), call);
  Tensor out = r.out.reshape({b, n, e});
  if (sub_norm_ != nullptr) out = sub_norm_->Forward(out);
  return out_proj_->Forward(out);
}

std::shared_ptr<const AttentionPlan> MultiheadDilatedAttention::PlanFor(
    const TensorSpec& inputs, const SequenceParallelContext* sp) const {
  PlanKey key;
  key.inputs = inputs;
  key.training = is_training();
  if (sp != nullptr) {
    key.comm = sp->comm;
    key.n = sp->n;
    key.stats = sp->stats;
  }
  const auto same = [](const PlanKey& a, const PlanKey& b) {
    return a.inputs.shape == b.inputs.shape &&
           a.inputs.dtype == b.inputs.dtype &&
           a.inputs.device == b.inputs.device && a.training == b.training &&
           a.comm == b.comm && a.n == b.n && a.stats == b.stats;
  };
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (plan_ == nullptr || !same(*plan_key_, key)) {
    plan_ = nullptr;  // the old plan's memory goes before the new one's
    plan_ = MakeAttentionPlan(options_.attention, inputs, key.training, sp);
    plan_key_ = key;
  }
  return plan_;
}

absl::StatusOr<std::shared_ptr<MultiheadDilatedAttention>>
CreateMultiheadAttention(const std::string& type,
                         MultiheadAttentionOptions options, Generator& gen) {
  LC_ASSIGN_OR_RETURN(options.attention.type, ParseAttentionType(type));
  LC_RETURN_IF_ERROR(ValidateMultiheadAttentionOptions(options));
  return std::make_shared<MultiheadDilatedAttention>(options, gen);
}

}  // namespace lc
