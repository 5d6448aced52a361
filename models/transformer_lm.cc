#include "models/transformer_lm.h"

#include <sys/mman.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/recompute.h"
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

// Moves every parameter of `module` to `device` in place, like PyTorch's
// param.data = param.data.to(device): each keeps its TensorImpl (which the
// modules hold and the optimizer will) and gets its storage replaced by a
// copy on `device`.
void MoveParametersTo(const Module& module, Device device) {
  for (const Tensor& param : module.Parameters()) {
    if (param.device() == device) continue;
    LC_CHECK(param.is_contiguous() && param.offset() == 0)
        << "a freshly made parameter is dense";
    param.impl().storage = param.detach().to(device).storage();
  }
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

// The blocks and the final norm in config.dtype, under the names of the
// model's own (blocks.0.attn.q_proj.weight, ..., final_norm.weight). Their
// initial values do not matter: Forward overwrites them from the masters.
class ComputeTwins : public Module {
 public:
  explicit ComputeTwins(const TransformerConfig& config) {
    Generator unused(0);
    auto list = RegisterModule("blocks", std::make_shared<BlockList>());
    for (int64_t i = 0; i < config.num_layers; ++i) {
      blocks.push_back(std::make_shared<TransformerBlock>(config, unused));
      list->Append(blocks.back());
    }
    final_norm = RegisterModule("final_norm", MakeNorm(config));
    MoveParametersTo(*this, config.device);
  }

  std::vector<std::shared_ptr<TransformerBlock>> blocks;
  std::shared_ptr<Module> final_norm;
};

}  // namespace models_internal

DType ParameterDType(const TransformerConfig& config) {
  return config.dtype == DType::kBFloat16 ? DType::kFloat32 : config.dtype;
}

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
  if (config.device.is_cuda() &&
      (config.device.index < 0 || config.device.index >= CudaDeviceCount())) {
    return invalid("device ", config.device.ToString(), " (this machine has ",
                   CudaDeviceCount(), " CUDA devices)");
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

namespace {

// *out = a * b + c; false when that overflows int64.
bool MulAdd(int64_t a, int64_t b, int64_t c, int64_t* out) {
  int64_t product;
  return !__builtin_mul_overflow(a, b, &product) &&
         !__builtin_add_overflow(product, c, out);
}

// The model's sizes, for errors about its memory.
std::string DescribeSizes(const TransformerConfig& config) {
  return absl::StrCat("a model of d_model ", config.d_model, ", num_layers ",
                      config.num_layers, ", num_heads ", config.num_heads,
                      ", mlp_hidden ",
                      config.mlp_hidden > 0 ? absl::StrCat(config.mlp_hidden)
                                            : std::string("4 * d_model"),
                      " and vocab_size ", config.vocab_size,
                      config.tied_embeddings ? "" : " (untied output head)");
}

constexpr char kSmaller[] =
    " (expected a smaller d_model, num_layers, mlp_hidden or vocab_size)";

// Checks that the parameters of `config` can be made before any is: their
// count (at least the embedding, an untied output head, and each block's
// attention and MLP matrices; biases and norms add O(d_model) per block) must
// fit int64 bytes, and the kernel must agree to provide that many bytes. The
// probe maps that much anonymous memory and unmaps it untouched: under
// Linux's default overcommit policy this fails at once for a request beyond
// RAM plus swap, the address space or RLIMIT_AS, where building the model
// would instead fail (or swap) after gigabytes were initialized. A size
// merely above the free memory passes. Sets *bytes to the byte count.
absl::Status CheckParameterMemory(const TransformerConfig& config,
                                  int64_t* bytes) {
  const int64_t d = config.d_model;
  int64_t hidden = config.mlp_hidden;
  int64_t square, attention, mlp, block, embed, embed_and_head, count;
  if ((hidden == 0 && !MulAdd(d, 4, 0, &hidden)) || !MulAdd(d, d, 0, &square) ||
      !MulAdd(square, 4, 0, &attention) || !MulAdd(d, hidden, 0, &mlp) ||
      !MulAdd(mlp, 2, attention, &block) ||
      !MulAdd(config.vocab_size, d, 0, &embed) ||
      !MulAdd(embed, config.tied_embeddings ? 1 : 2, 0, &embed_and_head) ||
      !MulAdd(block, config.num_layers, embed_and_head, &count) ||
      !MulAdd(count, DTypeSize(ParameterDType(config)), 0, bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(DescribeSizes(config),
                     " needs 2^63 bytes or more of parameters", kSmaller));
  }
  void* probe =
      mmap(nullptr, static_cast<size_t>(*bytes), PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (probe == MAP_FAILED) {
    const int error = errno;
    return absl::ResourceExhaustedError(absl::StrCat(
        DescribeSizes(config), " needs at least ", count, " parameters, ",
        *bytes, " bytes of ", DTypeName(ParameterDType(config)),
        ", more memory than this machine can provide (", std::strerror(error),
        ")", kSmaller));
  }
  munmap(probe, static_cast<size_t>(*bytes));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<TransformerLM>> TransformerLM::Create(
    const TransformerConfig& config, Generator& gen) {
  LC_RETURN_IF_ERROR(ValidateTransformerConfig(config));
  int64_t bytes = 0;
  LC_RETURN_IF_ERROR(CheckParameterMemory(config, &bytes));
  std::shared_ptr<TransformerLM> model;
  const absl::Status status =
      StatusFromCall([&] { model.reset(new TransformerLM(config, gen)); });
  if (status.code() == absl::StatusCode::kResourceExhausted) {
    // More than the probe: the temporaries of initialization, the device's
    // copy, or memory that others took meanwhile.
    return absl::ResourceExhaustedError(absl::StrCat(
        DescribeSizes(config), " with ", bytes,
        " bytes of parameters does not fit: ", status.message(), kSmaller));
  }
  LC_RETURN_IF_ERROR(status);
  return model;
}

TransformerLM::TransformerLM(const TransformerConfig& config, Generator& gen)
    : config_(config) {
  // The parameters, initialized on the CPU in their own dtype.
  TransformerConfig master = config;
  master.dtype = ParameterDType(config);
  master.device = Device::Cpu();
  embed_ = RegisterModule(
      "embed", std::make_shared<nn::Embedding>(
                   master.vocab_size, master.d_model, gen, master.dtype));
  models_internal::NormalInit(embed_->weight(), models_internal::kInitStd, gen);
  auto blocks =
      RegisterModule("blocks", std::make_shared<models_internal::BlockList>());
  for (int64_t i = 0; i < master.num_layers; ++i) {
    blocks_.push_back(
        std::make_shared<models_internal::TransformerBlock>(master, gen));
    blocks->Append(blocks_.back());
  }
  final_norm_ = RegisterModule("final_norm", models_internal::MakeNorm(master));
  if (!master.tied_embeddings) {
    lm_head_ = RegisterModule("lm_head", std::make_shared<nn::Linear>(
                                             master.d_model, master.vocab_size,
                                             false, gen, master.dtype));
    models_internal::NormalInit(lm_head_->weight(), models_internal::kInitStd,
                                gen);
  }
  models_internal::MoveParametersTo(*this, config.device);
  const Tensor& head =
      lm_head_ != nullptr ? lm_head_->weight() : embed_->weight();
  if (config.dtype == master.dtype) {
    run_blocks_ = blocks_;
    run_final_norm_ = final_norm_;
    run_head_ = head;
    return;
  }
  twins_ = std::make_shared<models_internal::ComputeTwins>(config);
  const std::map<std::string, Tensor> masters = StateDict();
  for (const auto& [name, twin] : twins_->NamedParameters()) {
    twin_of_.emplace_back(masters.at(name), twin);
  }
  run_head_ = Empty(head.shape(), config.dtype, config.device);
  twin_of_.emplace_back(head, run_head_);
  run_blocks_ = twins_->blocks;
  run_final_norm_ = twins_->final_norm;
}

void TransformerLM::RefreshTwins() const {
  twins_->Train(is_training());
  for (const auto& [master, twin] : twin_of_) {
    CopyInto(twin, master);
    if (!GradEnabled()) continue;
    Tensor output = twin;  // shares the twin's TensorImpl
    RecordOp("MasterWeightCast", {master}, {&output},
             [dtype = master.dtype()](const Tensors& g) -> Tensors {
               return {g[0].to(dtype)};
             });
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
  CheckIndexTensor("TransformerLM", "tokens", tokens, config_.device);
  if (const std::optional<IndexAt> bad =
          FindInvalidIndex(tokens, config_.vocab_size)) {
    ThrowInvalidArgument("TransformerLM: token id ", bad->value, " at [",
                         bad->position / tokens.size(1), ", ",
                         bad->position % tokens.size(1),
                         "] is out of range (expected 0 <= id < vocab_size = ",
                         config_.vocab_size, ")");
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
  const Tensor positions = Positions(n_local, sp).to(config_.device);
  // A copy, so that recomputation in backward does not read a context the
  // caller has since dropped (its communicator must still be alive).
  std::optional<SequenceParallelContext> sp_copy;
  if (sp != nullptr) sp_copy = *sp;

  if (twins_ != nullptr) RefreshTwins();
  // Tokens stay where they are: Embedding takes host indices for a device
  // table (copying them over), and checking them there needs no wait for the
  // device.
  Tensor x = embed_->Forward(tokens).to(config_.dtype);
  for (const auto& block : run_blocks_) {
    if (config_.recompute && GradEnabled()) {
      x = Recompute(
          [block, positions, sp_copy](const Tensors& in) -> Tensors {
            return {block->Forward(in[0], positions,
                                   sp_copy ? &*sp_copy : nullptr)};
          },
          {x})[0];
    } else {
      x = block->Forward(x, positions, sp);
    }
  }
  x = models_internal::ApplyNorm(*run_final_norm_, x);
  return Linear(x, run_head_, Tensor());
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
  CheckIndexTensor("TransformerLM::Loss", "targets", targets, config_.device);
  LC_REQUIRE(global_count >= 0, "TransformerLM::Loss: global_count ",
             global_count,
             " (expected the count of non-ignored targets over all ranks)");
  // Checked here, before the forward pass, to name vocab_size (CrossEntropy
  // checks again, in its own words). Targets on the host are read there; on
  // config.device the check waits for it.
  if (const std::optional<IndexAt> bad = FindInvalidIndex(
          targets, config_.vocab_size, /*ignore_index=*/-100)) {
    ThrowInvalidArgument("TransformerLM::Loss: target ", bad->value,
                         " (expected 0 <= target < vocab_size = ",
                         config_.vocab_size, " or -100 to ignore)");
  }
  Tensor logits = Forward(tokens, sp);
  if (logits.dtype() == DType::kBFloat16) logits = logits.to(DType::kFloat32);
  const int64_t rows = logits.size(0) * logits.size(1);
  // The sum over this rank's targets (left where they are, as tokens are),
  // divided once by the count over all ranks: the caller counted them once
  // per step, so they are not counted again here.
  const Tensor sum =
      CrossEntropy(logits.reshape({rows, config_.vocab_size}),
                   targets.reshape({rows}), -100, LossReduction::kSum);
  return MulScalar(sum, global_count > 0 ? 1.0 / global_count : 0.0);
}

}  // namespace lc
