// Attention under a pattern, as one differentiable op: dense, dilated,
// block-sparse and their intersection all run through the partial-attention
// primitive (attention/partial_attention.h) tile by tile. Forward saves q, k,
// v, out and lse only; backward recomputes the probabilities tile by tile, so
// no [n, n] tensor exists at any time.
#ifndef LONGCTX_ATTENTION_ATTENTION_H_
#define LONGCTX_ATTENTION_ATTENTION_H_

#include "attention/attention_options.h"
#include "attention/pattern.h"
#include "core/tensor.h"

namespace lc {

// Attention of q over k, v ([batch, n, heads, head_dim], one dtype: float32,
// float64, or bfloat16 computed in float32) under `pattern`: one call of a
// plan made for it (MakeAttentionPlan; a layer that calls again with the
// same shapes keeps the plan instead, as the multihead module does).
// Differentiable in q, k, v (and through lse). On a CUDA device (q, k, v on the
// same one; head_dim <= 256) options.backend picks cuDNN's fused flash
// attention (attention_cudnn.h) or our fused kernels, which compute bfloat16
// natively on tensor cores with float32 accumulation (head_dim 64 and 128;
// other head dims and float32/float64 on FMA units); the key padding mask may
// be on the CPU or the device. Throws lc::Error naming the bad value for
// mismatched shapes, dtypes or devices, a pattern for a different number of
// heads, a block mask for a different length, a bad dropout or padding mask,
// dropout without a generator or beyond 2^32 tokens, streams or generator
// offsets (its draws would repeat), backend kCudnn with deterministic, or a
// call backend kCudnn cannot run.
AttentionResult Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionPattern& pattern,
                          const AttentionOptions& options = {},
                          const AttentionCallOptions& call = {});

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_H_
