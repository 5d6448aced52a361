#include "models/transformer_lm.h"

#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "core/checkpoint.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "ops/activation.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/shape_ops.h"

namespace lc {
namespace models_internal {
namespace {

// Redraws `w` from N(0, std^2) (GPT-2's init for embeddings and the output
// head; torch.nn.Embedding's N(0, 1) would make tied logits ~sqrt(d) large).
void NormalInit(const Tensor& w, double std, Generator& gen) {
  NoGradGuard no_grad;
  std::vector<double> values =
      Randn(w.shape(), gen, DType::kFloat64).ToVector();
  for (double& x : values) x *= std;
  CopyInto(w, FromVector(values, w.shape(), DType::kFloat64));
}

constexpr double kInitStd = 0.02;

std::shared_ptr<Module> MakeNorm(const TransformerConfig& config) {
  if (config.norm == TransformerConfig::Norm::kRMSNorm) {
    return std::make_shared<nn::RMSNorm>(config.d_model, 1e-6, config.dtype);
  }
  return std::make_shared<nn::LayerNorm>(config.d_model, 1e-5, true,
                                         config.dtype);
}

Tensor ApplyNorm(const Module& norm, const Tensor& x) {
  if (const auto* ln = dynamic_cast<const nn::LayerNorm*>(&norm)) {
    return ln->Forward(x);
  }
  return static_cast<const nn::RMSNorm&>(norm).Forward(x);
}

}  // namespace

// fc2(gelu(fc1(x))), parameters fc1.*, fc2.*.
class Mlp : public Module {
 public:
  Mlp(int64_t d_model, int64_t hidden, Generator& gen, DType dtype) {
    fc1_ = RegisterModule(
        "fc1", std::make_shared<nn::Linear>(d_model, hidden, true, gen, dtype));
    fc2_ = RegisterModule(
        "fc2", std::make_shared<nn::Linear>(hidden, d_model, true, gen, dtype));
  }

  Tensor Forward(const Tensor& x) const {
    return fc2_->Forward(Gelu(fc1_->Forward(x)));
  }

 private:
  std::shared_ptr<nn::Linear> fc1_, fc2_;
};

class TransformerBlock : public Module {
 public:
  TransformerBlock(const TransformerConfig& config, Generator& gen)
      : dropout_(config.dropout) {
    norm1_ = RegisterModule("norm1", MakeNorm(config));
    MultiheadAttentionOptions options;
    options.embed_dim = config.d_model;
    options.num_heads = config.num_heads;
    options.rope_base = config.rope_base;
    options.dtype = config.dtype;
    options.attention = config.attention;
    attn_ = RegisterModule(
        "attn", std::make_shared<MultiheadDilatedAttention>(options, gen));
    norm2_ = RegisterModule("norm2", MakeNorm(config));
    const int64_t hidden =
        config.mlp_hidden > 0 ? config.mlp_hidden : 4 * config.d_model;
    mlp_ = RegisterModule("mlp", std::make_shared<Mlp>(config.d_model, hidden,
                                                       gen, config.dtype));
  }

  // x [batch, n_local, d_model], positions int64 [n_local].
  Tensor Forward(const Tensor& x, const Tensor& positions,
                 const SequenceParallelContext* sp) const {
    const bool training = is_training();
    Tensor a = attn_->Forward(ApplyNorm(*norm1_, x), Tensor(), sp, positions);
    Tensor h = Add(x, Dropout(a, dropout_, training));
    Tensor m = mlp_->Forward(ApplyNorm(*norm2_, h));
    return Add(h, Dropout(m, dropout_, training));
  }

 private:
  double dropout_;
  std::shared_ptr<Module> norm1_, norm2_;
  std::shared_ptr<MultiheadDilatedAttention> attn_;
  std::shared_ptr<Mlp> mlp_;
};

// The "blocks" container: children named 0, 1, ... (blocks.0.attn.*).
class BlockList : public Module {
 public:
  void Append(std::shared_ptr<TransformerBlock> block) {
    RegisterModule(std::to_string(size_++), std::move(block));
  }

 private:
  int64_t size_ = 0;
};

}  // namespace models_internal

absl::Status ValidateTransformerConfig(const TransformerConfig& config) {
  auto invalid = [](auto&&... pieces) {
    return absl::InvalidArgumentError(absl::StrCat(pieces...));
  };
  if (config.vocab_size < 1) {
    return invalid("vocab_size ", config.vocab_size, " (expected >= 1)");
  }
  if (config.context < 1) {
    return invalid("context ", config.context, " (expected >= 1 tokens)");
  }
  if (config.d_model < 1) {
    return invalid("d_model ", config.d_model, " (expected >= 1)");
  }
  if (config.num_layers < 1) {
    return invalid("num_layers ", config.num_layers, " (expected >= 1)");
  }
  if (config.num_heads < 1 || config.d_model % config.num_heads != 0) {
    return invalid("num_heads ", config.num_heads, " with d_model ",
                   config.d_model,
                   " (expected num_heads >= 1 dividing d_model)");
  }
  const int64_t head_dim = config.d_model / config.num_heads;
  if (head_dim % 2 != 0) {
    return invalid("head_dim ", head_dim, " = d_model ", config.d_model,
                   " / num_heads ", config.num_heads,
                   " (expected even: rotary positions rotate pairs)");
  }
  if (config.mlp_hidden < 0) {
    return invalid("mlp_hidden ", config.mlp_hidden,
                   " (expected >= 1, or 0 for 4 * d_model)");
  }
  if (!(config.dropout >= 0 && config.dropout < 1)) {
    return invalid("dropout ", config.dropout, " (expected in [0, 1))");
  }
  if (!(config.rope_base > 0) || !std::isfinite(config.rope_base)) {
    return invalid("rope_base ", config.rope_base,
                   " (expected a finite number > 0)");
  }
  if (!IsFloating(config.dtype)) {
    return invalid("dtype ", DTypeName(config.dtype),
                   " (expected float32, float64 or bfloat16)");
  }
  if (!config.attention.causal) {
    return invalid(
        "attention.causal false (a language model needs causal attention)");
  }
  if (config.attention.ranks > config.context) {
    return invalid("attention.ranks ", config.attention.ranks, " with context ",
                   config.context, " (expected at most one rank per token)");
  }
  absl::Status attention = ValidateAttentionConfig(config.attention);
  if (!attention.ok()) {
    return invalid("attention: ", attention.message());
  }
  absl::Status pattern =
      BuildAttentionPattern(config.attention, config.num_heads, config.context)
          .status();
  if (!pattern.ok()) {
    return invalid("attention: ", pattern.message(), " (for context ",
                   config.context, ")");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<TransformerLM>> TransformerLM::Create(
    const TransformerConfig& config, Generator& gen) {
  LC_RETURN_IF_ERROR(ValidateTransformerConfig(config));
  return std::shared_ptr<TransformerLM>(new TransformerLM(config, gen));
}

TransformerLM::TransformerLM(const TransformerConfig& config, Generator& gen)
    : config_(config) {
  embed_ = RegisterModule(
      "embed", std::make_shared<nn::Embedding>(
                   config.vocab_size, config.d_model, gen, config.dtype));
  models_internal::NormalInit(embed_->weight(), models_internal::kInitStd, gen);
  auto blocks =
      RegisterModule("blocks", std::make_shared<models_internal::BlockList>());
  for (int64_t i = 0; i < config.num_layers; ++i) {
    blocks_.push_back(
        std::make_shared<models_internal::TransformerBlock>(config, gen));
    blocks->Append(blocks_.back());
  }
  final_norm_ = RegisterModule("final_norm", models_internal::MakeNorm(config));
  if (!config.tied_embeddings) {
    lm_head_ = RegisterModule("lm_head", std::make_shared<nn::Linear>(
                                             config.d_model, config.vocab_size,
                                             false, gen, config.dtype));
    models_internal::NormalInit(lm_head_->weight(), models_internal::kInitStd,
                                gen);
  }
}

Tensor TransformerLM::Positions(int64_t n_local,
                                const SequenceParallelContext* sp) const {
  std::vector<double> positions;
  positions.reserve(n_local);
  if (sp == nullptr) {
    for (int64_t t = 0; t < n_local; ++t) positions.push_back(t);
  } else {
    for (const PositionSpan& span :
         RankSpans(config_.context, sp->comm->size(), sp->comm->rank(),
                   config_.attention.layout)) {
      for (int64_t t = span.begin; t < span.end; ++t) positions.push_back(t);
    }
  }
  return FromVector(positions, {static_cast<int64_t>(positions.size())},
                    DType::kInt64);
}

Tensor TransformerLM::Forward(const Tensor& tokens,
                              const SequenceParallelContext* sp) const {
  LC_REQUIRE(tokens.defined() && tokens.dim() == 2,
             "TransformerLM: tokens of shape ",
             tokens.defined() ? ShapeToString(tokens.shape()) : "undefined",
             " (expected int64 [batch, n_local])");
  CheckIndexTensor("TransformerLM", "tokens", tokens);
  {
    const Tensor ids = tokens.contiguous();
    const int64_t* data = ids.data<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) {
      LC_REQUIRE(data[i] >= 0 && data[i] < config_.vocab_size,
                 "TransformerLM: token id ", data[i], " at [",
                 i / tokens.size(1), ", ", i % tokens.size(1),
                 "] is out of range (expected 0 <= id < vocab_size = ",
                 config_.vocab_size, ")");
    }
  }
  const int64_t n_local = tokens.size(1);
  if (sp == nullptr) {
    LC_REQUIRE(config_.attention.ranks == 1, "TransformerLM: attention.ranks ",
               config_.attention.ranks,
               " needs a sequence-parallel context (sp)");
    LC_REQUIRE(n_local <= config_.context, "TransformerLM: ", n_local,
               " tokens per sequence (expected at most context = ",
               config_.context, ")");
  } else {
    LC_REQUIRE(
        sp->comm != nullptr && sp->comm->size() == config_.attention.ranks,
        "TransformerLM: a sequence-parallel group of ",
        sp->comm != nullptr ? sp->comm->size() : 0,
        " ranks (expected attention.ranks = ", config_.attention.ranks, ")");
    LC_REQUIRE(sp->n == config_.context, "TransformerLM: sp->n ", sp->n,
               " (expected context = ", config_.context, ")");
    const int64_t expected =
        RankTokenCount(config_.context, sp->comm->size(), sp->comm->rank(),
                       config_.attention.layout);
    LC_REQUIRE(n_local == expected, "TransformerLM: rank ", sp->comm->rank(),
               " got ", n_local, " tokens (expected ", expected, " of context ",
               config_.context, " in the ",
               SequenceLayoutName(config_.attention.layout), " layout)");
  }
  const Tensor positions = Positions(n_local, sp);
  // A copy, so that recomputation in backward does not read a context the
  // caller has since dropped (its communicator must still be alive).
  std::optional<SequenceParallelContext> sp_copy;
  if (sp != nullptr) sp_copy = *sp;

  Tensor x = embed_->Forward(tokens);
  for (const auto& block : blocks_) {
    if (config_.recompute && GradEnabled()) {
      x = Checkpoint(
          [block, positions, sp_copy](const Tensors& in) -> Tensors {
            return {block->Forward(in[0], positions,
                                   sp_copy ? &*sp_copy : nullptr)};
          },
          {x})[0];
    } else {
      x = block->Forward(x, positions, sp);
    }
  }
  x = models_internal::ApplyNorm(*final_norm_, x);
  const Tensor& head =
      lm_head_ != nullptr ? lm_head_->weight() : embed_->weight();
  return Linear(x, head, Tensor());
}

Tensor TransformerLM::Loss(const Tensor& tokens, const Tensor& targets,
                           int64_t global_count,
                           const SequenceParallelContext* sp) const {
  LC_REQUIRE(tokens.defined() && targets.defined() &&
                 targets.shape() == tokens.shape(),
             "TransformerLM::Loss: targets of shape ",
             targets.defined() ? ShapeToString(targets.shape()) : "undefined",
             " (expected the tokens' shape ",
             tokens.defined() ? ShapeToString(tokens.shape()) : "undefined",
             ")");
  CheckIndexTensor("TransformerLM::Loss", "targets", targets);
  int64_t local_count = 0;
  for (double t : targets.ToVector()) {
    if (t == -100) continue;
    LC_REQUIRE(t >= 0 && t < config_.vocab_size, "TransformerLM::Loss: target ",
               static_cast<int64_t>(t),
               " (expected 0 <= target < vocab_size = ", config_.vocab_size,
               " or -100 to ignore)");
    ++local_count;
  }
  LC_REQUIRE(global_count >= local_count, "TransformerLM::Loss: global_count ",
             global_count, " is less than this rank's ", local_count,
             " non-ignored targets (expected the count over all ranks)");
  const Tensor logits = Forward(tokens, sp);
  const int64_t rows = logits.size(0) * logits.size(1);
  const Tensor mean = CrossEntropy(logits.reshape({rows, config_.vocab_size}),
                                   targets.reshape({rows}), -100);
  // mean = sum / local_count (0 when every target is ignored).
  const double weight =
      global_count > 0 ? static_cast<double>(local_count) / global_count : 0;
  return MulScalar(mean, weight);
}

}  // namespace lc
