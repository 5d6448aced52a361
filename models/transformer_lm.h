// TransformerLM: a decoder-only transformer language model over byte tokens
// for long contexts: token embedding, pre-norm blocks (LayerNorm or RMSNorm;
// multi-head attention of any attention_config.h type with rotary positions
// from global token positions; GELU MLP; residual dropout), a final norm and
// a tied or untied output head. Context-parallel: with a sequence-parallel
// context each rank feeds only its own tokens (split before the projections);
// only attention communicates. Parameter names follow PyTorch/HF
// ("embed.weight", "blocks.0.attn.q_proj.weight", "final_norm.weight", ...).
//
// Initialization: embed.weight and lm_head.weight N(0, 0.02^2) (GPT-2), the
// attention projections as MultiheadDilatedAttention does (Xavier normal,
// biases 0), the MLP like torch.nn.Linear, norm scales 1 and biases 0.
// LayerNorm uses eps 1e-5 (with bias), RMSNorm eps 1e-6 (no bias). Dropout
// (residual and attention) draws from the thread's DefaultGenerator(), so
// seeding it makes a run repeatable and recomputation replays the masks.
//
// Devices and precision: the model lives on config.device (the CPU or a CUDA
// device; initialized on the CPU, so every device starts from the same
// weights). A bfloat16 model trains in mixed precision, like PyTorch's
// autocast: its parameters are float32 master weights, and every Forward
// rounds each one once to a bfloat16 copy (a differentiable cast, so the
// gradients reach the masters in float32) that the blocks, the final norm
// and the output head compute with; activations, GEMMs and attention are
// bfloat16, the norms and the loss accumulate in float32, and the
// embedding looks its rows up in the float32 table.
#ifndef LONGCTX_MODELS_TRANSFORMER_LM_H_
#define LONGCTX_MODELS_TRANSFORMER_LM_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attention/attention_config.h"
#include "attention/multihead_attention.h"
#include "core/device.h"
#include "core/module.h"
#include "core/random.h"
#include "core/tensor.h"
#include "ops/dropout.h"
#include "ops/embedding.h"
#include "ops/linear.h"
#include "ops/norm.h"

namespace lc {

struct TransformerConfig {
  int64_t vocab_size = 256;  // bytes
  int64_t context = 4096;    // tokens per sequence (n)
  int64_t d_model = 64;
  int64_t num_layers = 2;
  int64_t num_heads = 4;   // must divide d_model; head_dim even (RoPE)
  int64_t mlp_hidden = 0;  // 0: 4 * d_model
  enum class Norm { kLayerNorm, kRMSNorm } norm = Norm::kLayerNorm;
  bool tied_embeddings = true;  // output head = embedding^T
  // Residual/MLP dropout (attention dropout is attention.dropout).
  double dropout = 0;
  double rope_base = 10000;
  bool recompute = false;  // lc::Recompute around each block
  // Type, pattern, causal (must be true for an LM), ranks, layout.
  AttentionConfig attention;
  // The compute dtype (activations, GEMMs, attention, logits): float32 or
  // float64 (the parameters' dtype too), or bfloat16 (mixed precision with
  // float32 parameters, see above).
  DType dtype = DType::kFloat32;
  // Where the parameters live and the model computes.
  Device device = Device::Cpu();
};

// The dtype of the parameters: float32 for a bfloat16 (mixed-precision)
// model, else config.dtype.
DType ParameterDType(const TransformerConfig& config);

// Checks every field; the error names the bad value and what was expected
// (d_model % num_heads, odd head_dim, non-causal attention, context < 1,
// ranks > context, a ring type needed for ranks > 1, invalid attention
// options, a CUDA device that is not there, ...).
absl::Status ValidateTransformerConfig(const TransformerConfig& config);

namespace models_internal {

// One pre-norm block: x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x)))
// with mlp = fc2(gelu(fc1)). Parameters: norm1.*, attn.*, norm2.*,
// mlp.fc1.*, mlp.fc2.*.
class TransformerBlock;

// Mixed precision: the bfloat16 twins of the blocks and the final norm,
// whose weights Forward refreshes from the masters.
class ComputeTwins;

}  // namespace models_internal

class TransformerLM : public Module {
 public:
  // Validates the config and initializes the weights from `gen`. Sizes whose
  // parameters cannot be counted in int64 bytes are InvalidArgument; a model
  // whose parameters the machine cannot provide (checked before any is made,
  // so that this fails at once) or whose allocation fails is
  // ResourceExhausted; both name d_model, num_layers, num_heads, mlp_hidden,
  // vocab_size and the bytes needed.
  static absl::StatusOr<std::shared_ptr<TransformerLM>> Create(
      const TransformerConfig& config, Generator& gen);

  // tokens: int64 [batch, n_local], this rank's tokens, on the CPU (copied
  // to config.device) or on config.device. With sp == nullptr:
  // any n_local <= context tokens at positions 0..n_local-1. With sp: the
  // tokens of RankSpans(context, ranks, rank, attention.layout) in
  // SplitSequence order (sp->n must equal context). Returns logits
  // [batch, n_local, vocab_size] in config.dtype on config.device. RoPE uses
  // global positions. Token ids on a CUDA device are checked there (a wait).
  // Throws lc::Error on bad input (shape, dtype, token id outside
  // [0, vocab_size), a token count that does not fit, ranks > 1 without sp).
  // With recompute, blocks rerun in backward: sp->comm must stay alive until
  // backward has run (sp itself is copied).
  Tensor Forward(const Tensor& tokens,
                 const SequenceParallelContext* sp = nullptr) const;

  // Next-token loss of this rank's tokens: the sum of cross-entropy over
  // `targets` (int64 [batch, n_local], -100 = ignore) divided by
  // `global_count` (the number of non-ignored targets over all ranks, which
  // the caller counts: Loss does not count them), so that summing the
  // per-rank losses and all-reducing gradients gives exactly the single-rank
  // mean and gradient. Targets may be on the CPU or on config.device (then
  // range-checked there, a wait). The logits enter the cross-entropy in
  // float32 when config.dtype is bfloat16. A scalar on config.device,
  // float64 for a float64 model and float32 otherwise (0 when global_count is
  // 0). Throws lc::Error for targets of another shape, a target outside
  // [0, vocab_size) other than -100, or a negative global_count.
  Tensor Loss(const Tensor& tokens, const Tensor& targets, int64_t global_count,
              const SequenceParallelContext* sp = nullptr) const;

  const TransformerConfig& config() const { return config_; }

  // The global positions (int64 [n_local], on the CPU) of this rank's
  // tokens: 0..n-1 without sp, else those of RankSpans(context, ranks, rank,
  // layout).
  Tensor Positions(int64_t n_local, const SequenceParallelContext* sp) const;

 private:
  explicit TransformerLM(const TransformerConfig& config, Generator& gen);

  // Mixed precision: copies every master weight into its bfloat16 twin and,
  // in grad mode, makes the twin the output of a cast whose backward hands
  // the twin's gradient to the master in float32.
  void RefreshTwins() const;

  TransformerConfig config_;
  // The parameters (the masters in mixed precision).
  std::shared_ptr<nn::Embedding> embed_;
  std::vector<std::shared_ptr<models_internal::TransformerBlock>> blocks_;
  std::shared_ptr<Module> final_norm_;   // nn::LayerNorm or nn::RMSNorm
  std::shared_ptr<nn::Linear> lm_head_;  // untied only
  // Mixed precision only: the twins and the (master, twin) pairs, the output
  // head's among them (one bfloat16 copy of the head weight, tied or not).
  std::shared_ptr<models_internal::ComputeTwins> twins_;
  std::vector<std::pair<Tensor, Tensor>> twin_of_;
  // What Forward computes with: the parameters' modules, or their twins.
  std::vector<std::shared_ptr<models_internal::TransformerBlock>> run_blocks_;
  std::shared_ptr<Module> run_final_norm_;
  Tensor run_head_;  // [vocab_size, d_model]
};

}  // namespace lc

#endif  // LONGCTX_MODELS_TRANSFORMER_LM_H_
