// MultiheadDilatedAttention: a drop-in multi-head attention module over
// [batch, n, embed_dim] inputs with any attention type of attention_config.h
// (dense, dilated, block-sparse, ring): q/k/v/out projections (optionally one
// fused qkv projection), an optional sub-layer norm before the output
// projection, a MAGNETO-style init gain (LongNet's recipe) and optional rotary
// position embedding of q and k, plus the factory
// CreateMultiheadAttention(type, options).
#ifndef LONGCTX_ATTENTION_MULTIHEAD_ATTENTION_H_
#define LONGCTX_ATTENTION_MULTIHEAD_ATTENTION_H_

#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "attention/attention_config.h"
#include "core/module.h"
#include "core/random.h"
#include "ops/linear.h"
#include "ops/norm.h"

namespace lc {

struct MultiheadAttentionOptions {
  int64_t embed_dim = 0;
  int64_t num_heads = 0;   // must divide embed_dim
  bool bias = true;        // biases of the projections
  bool fused_qkv = false;  // one [3 * embed_dim, embed_dim] projection
  // LayerNorm over the attention output before the output projection
  // (MAGNETO's sub-LN, as LongNet uses).
  bool sub_layer_norm = false;
  // Xavier-normal init with this gain for the value and output projections
  // (1 for q and k), biases 0. MAGNETO uses gain > 1 for deep stacks.
  double init_gain = 1.0;
  // Base of the rotary position embedding (ops/rope.h) applied to q and k
  // when Forward gets positions.
  double rope_base = 10000.0;
  DType dtype = DType::kFloat32;
  AttentionConfig attention;  // type, pattern, causal, dropout, ...
};

// Checks embed_dim, num_heads, init_gain, rope_base and the attention config.
absl::Status ValidateMultiheadAttentionOptions(
    const MultiheadAttentionOptions& options);

class MultiheadDilatedAttention : public Module {
 public:
  // Throws lc::Error for invalid options (see the factory for a Status).
  MultiheadDilatedAttention(const MultiheadAttentionOptions& options,
                            Generator& gen);

  // x [batch, n, embed_dim] -> [batch, n, embed_dim]. key_padding_mask:
  // uint8 [batch, n], nonzero = padding key (optional). With a ring type and
  // a sequence-parallel context, x holds this rank's tokens and the mask
  // covers the whole sequence (see RunAttention). positions: int64 [n], the
  // global positions of x's tokens; when given, q and k are rotated by
  // ApplyRotary(., positions, rope_base) after the projections (head_dim
  // must then be even); undefined for no rotary embedding.
  Tensor Forward(const Tensor& x, const Tensor& key_padding_mask = Tensor(),
                 const SequenceParallelContext* sp = nullptr,
                 const Tensor& positions = Tensor()) const;

  const MultiheadAttentionOptions& options() const { return options_; }

 private:
  // The attention plan for q of `inputs` ([batch, n_local, heads,
  // head_dim]): the one the last call made when nothing it depends on
  // changed, else a new one.
  std::shared_ptr<const AttentionPlan> PlanFor(
      const TensorSpec& inputs, const SequenceParallelContext* sp) const;

  MultiheadAttentionOptions options_;
  // NOTE [ A layer's attention plan ]: the plan is made on the first call
  // and kept for every later call with the same inputs' shape, dtype and
  // device, training mode and sequence-parallel context, so the steady
  // state of training plans nothing (attention_plan.h). Each call passes
  // its own state: the thread's DefaultGenerator() for dropout and the key
  // padding mask.
  struct PlanKey {
    TensorSpec inputs;
    bool training = false;
    const Communicator* comm = nullptr;
    int64_t n = 0;
    RingStats* stats = nullptr;
  };
  mutable std::mutex plan_mu_;
  mutable std::optional<PlanKey> plan_key_;
  mutable std::shared_ptr<const AttentionPlan> plan_;
  std::shared_ptr<nn::Linear> qkv_proj_;  // fused only
  std::shared_ptr<nn::Linear> q_proj_, k_proj_, v_proj_;
  std::shared_ptr<nn::LayerNorm> sub_norm_;  // sub_layer_norm only
  std::shared_ptr<nn::Linear> out_proj_;
};

// The factory: `type` is dense, dilated, block_sparse, ring_dilated or
// ring_block_sparse (it overrides options.attention.type). An unknown type or
// invalid option is an error naming it.
absl::StatusOr<std::shared_ptr<MultiheadDilatedAttention>>
CreateMultiheadAttention(const std::string& type,
                         MultiheadAttentionOptions options, Generator& gen);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_MULTIHEAD_ATTENTION_H_
