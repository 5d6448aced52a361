// Dense masked attention in plain float64 loops: the readable oracle of
// SPEC section 2 for small n. It materializes per-pair weights over all
// [n, n] pairs (O(n^2) time and memory), so it is for tests and small
// examples only; Attention (attention/attention.h) is the op to train with.
#ifndef LONGCTX_ATTENTION_REFERENCE_ATTENTION_H_
#define LONGCTX_ATTENTION_REFERENCE_ATTENTION_H_

#include <cstdint>

#include "attention/attention_options.h"
#include "core/tensor.h"

namespace lc {

// A sliding window over pairs: t - left <= u <= t + right (-1: that side
// unlimited).
struct PairWindow {
  int64_t left = -1;
  int64_t right = -1;
};

// float64 [batch, heads, n, n]: entry (b, h, t, u) is the number of patterns
// of head h that let query t attend key u, a pattern allowing the pair when
// DilatedPattern::Allows(t, u), pattern.block_mask->Allows(t, u) (when there
// is a block mask), u <= t (when causal), the pair is in `window` and key u
// of batch b is not padding (key_padding_mask: uint8 [batch, n], nonzero =
// padding; undefined for none). Throws lc::Error for a pattern that does not
// fit (bad (w, r, o), a block mask for another length) or a padding mask of
// the wrong shape.
Tensor PairCounts(const AttentionPattern& pattern, bool causal,
                  const Tensor& key_padding_mask, int64_t batch, int64_t n,
                  const PairWindow& window = {});

// float64 [batch, heads, n, n]: the sum, over the patterns that allow
// (t, u) as in PairCounts, of the attention-dropout keep factor of the pair
// under that pattern: 1 / (1 - dropout) when
// AttentionDropoutUniform(seed, offset, stream, n, t, u) >= dropout
// (core/philox.h), else 0, with stream = (b * heads + h) * max_patterns +
// pattern index and max_patterns the largest number of patterns of any head
// (at least 1). This is the draw of TileMask (attention/partial_attention.h),
// so it reproduces the dropout of Attention for the generator state (seed,
// offset) Attention used. With dropout = 0 it equals PairCounts. Throws
// lc::Error for dropout outside [0, 1), for dropout whose draws would not be
// distinct (CheckAttentionDropoutDraws) and as PairCounts.
Tensor DropoutKeepWeights(const AttentionPattern& pattern, bool causal,
                          const Tensor& key_padding_mask, int64_t batch,
                          int64_t n, double dropout, uint64_t seed,
                          uint64_t offset, const PairWindow& window = {});

// Attention of q over k, v ([batch, n, heads, head_dim], any floating dtype,
// read as float64) under `pattern` and `options`, computed from the weights
// above with C = PairCounts and K = DropoutKeepWeights (K = C without
// dropout), both with the options' window, and s = scale * q.k, soft-capped
// to options.softcap * tanh(s / options.softcap) when options.softcap > 0:
//   lse[b, h, t] = log sum_u C[t, u] exp(s(t, u))   (-inf if C's row is 0)
//   out[b, t, h] = sum_u K[t, u] exp(s(t, u) - lse) v[u]   (0 if no key).
// Returns float64 out [batch, n, heads, head_dim] and lse [batch, heads, n].
// Forward only: the result is not differentiable (no autograd history).
// The key padding mask is call.key_padding_mask. With options.dropout > 0
// it draws from call.generator (required) exactly as Attention does - one
// NextOffset() per call - so to compare the two, give each its own copy of
// one generator state. Tile sizes and tile order are ignored. Throws lc::Error
// for undefined, non-floating or mismatched q, k, v, a pattern for another
// number of heads, and as DropoutKeepWeights.
AttentionResult ReferenceAttention(const Tensor& q, const Tensor& k,
                                   const Tensor& v,
                                   const AttentionPattern& pattern,
                                   const AttentionOptions& options = {},
                                   const AttentionCallOptions& call = {});

}  // namespace lc

#endif  // LONGCTX_ATTENTION_REFERENCE_ATTENTION_H_
