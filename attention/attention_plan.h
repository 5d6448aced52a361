// AttentionPlan: everything an attention call of one shape needs that does
// not change from call to call - the validated pattern and options, the
// tile plans and the CUDA work lists uploaded to the device, the choice of
// cuDNN launches, and for ring attention the ring's steps, row maps and the
// ranks' agreement - built once and run for every call (a layer's plan
// serves every training step). A call adds only its own state
// (AttentionCallOptions: the dropout stream, the key padding mask).
#ifndef LONGCTX_ATTENTION_ATTENTION_PLAN_H_
#define LONGCTX_ATTENTION_ATTENTION_PLAN_H_

#include <memory>

#include "attention/attention_options.h"
#include "distributed/ring_exchange.h"

namespace lc {

class AttentionPlan {
 public:
  virtual ~AttentionPlan() = default;

  // One call on q, k, v of the plan's inputs() (any strides): Attention's
  // contract (attention.h), or RingAttention's for a ring plan.
  // Differentiable in q, k, v (and through lse). Throws lc::Error naming the
  // bad value for inputs of another shape, dtype or device than the plan's,
  // dropout without a generator, or a bad key padding mask.
  virtual AttentionResult Run(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionCallOptions& call = {}) const = 0;

  // The inputs the plan was made for: [batch, rows, heads, head_dim] (rows
  // is n on one rank, this rank's tokens in a ring), their dtype and device.
  virtual const TensorSpec& inputs() const = 0;
};

// The plan of one-rank attention of inputs `inputs` ([batch, n, heads,
// head_dim]) under `pattern` and `options`. Throws lc::Error for what
// Attention refuses before running (attention.h).
std::shared_ptr<const AttentionPlan> MakeAttentionPlan(
    const TensorSpec& inputs, const AttentionPattern& pattern,
    const AttentionOptions& options = {});

// The shape, dtype and device of t.
TensorSpec SpecOf(const Tensor& t);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_PLAN_H_
