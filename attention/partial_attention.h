// The partial-attention primitive that every attention path reduces to:
// queries of one (batch, head) against a set of keys, both given as strided
// row sets (dilation is a stride, not a copy), producing a partial (out, lse)
// that is merged into per-query accumulators with an overflow-safe merge.
// Several patterns, tiles and (in ring attention) ring steps are all calls of
// PartialAttentionForward merging into the same accumulators; backward
// recomputes probabilities from the final lse, tile by tile.
#ifndef LONGCTX_ATTENTION_PARTIAL_ATTENTION_H_
#define LONGCTX_ATTENTION_PARTIAL_ATTENTION_H_

#include <cstdint>

#include "attention/pattern.h"

namespace lc {

// `count` rows of head_dim elements: row i starts at data + i * row_stride
// and holds the token at global position position + i * position_step.
template <typename T>
struct RowSet {
  T* data = nullptr;
  int64_t row_stride = 0;  // elements between consecutive rows
  int64_t count = 0;
  int64_t position = 0;       // global position of row 0
  int64_t position_step = 1;  // global positions between consecutive rows
  int64_t PositionOf(int64_t i) const { return position + i * position_step; }
};

// Which (t, u) pairs of a tile are allowed beyond the pattern that chose the
// tile's rows, and the dropout applied to their probabilities.
struct TileMask {
  bool causal = false;  // u <= t
  // t - window_left <= u <= t + window_right (-1: that side unlimited).
  int64_t window_left = -1;
  int64_t window_right = -1;
  // > 0: every score s becomes softcap * tanh(s / softcap) before the
  // softmax (not a mask, but applied wherever scores are).
  double softcap = 0;
  const BlockMask* block_mask = nullptr;  // pair's block pair must be on
  // Keys to ignore, one byte per key row of the tile (nonzero = padding).
  const uint8_t* key_padding = nullptr;
  int64_t key_padding_step = 1;  // bytes between consecutive key rows
  // Attention dropout: pair (t, u) keeps its probability with probability
  // 1 - p, scaled by 1 / (1 - p); the draw is
  // AttentionDropoutUniform(seed, offset, stream, n, t, u) >= p
  // (core/philox.h), so forward and backward (and any tile order) see the
  // same mask.
  double dropout = 0;
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;
  uint64_t dropout_stream = 0;  // distinct per (batch, head, pattern)
  int64_t sequence_length = 0;  // n in the draw index
};

// Throws lc::Error naming the value unless every pair of a call of `op`
// with attention dropout gets its own draw (AttentionDropoutUniform): n
// tokens and `streams` (batch x heads x the most patterns of a head) at
// most 2^32, the generator offset below 2^32.
void CheckAttentionDropoutDraws(const char* op, int64_t n, int64_t streams,
                                uint64_t offset);

// Merges the partial (o2, lse2) into (o1, lse1) for one query row of d
// elements, giving their joint softmax: with w = sigmoid(lse2 - lse1),
// o1 += w (o2 - o1) and lse1 += softplus(lse2 - lse1), computed so that no
// exp overflows; lse = -inf marks an empty side (o = 0), and a side with
// lse = +inf (a +inf score: o NaN) makes the merge +inf with o NaN.
template <typename T>
void MergeAttentionRow(T* o1, T* lse1, const T* o2, T lse2, int64_t d);

// Scratch memory for one thread's tiles (reused across calls).
struct AttentionScratch;
AttentionScratch* NewAttentionScratch();
void DeleteAttentionScratch(AttentionScratch* scratch);

// Forward of one tile: partial attention of q's rows against k/v's rows
// (k and v share positions and count), merged into out (rows parallel to q,
// row stride out_stride) and lse (one per q row, stride lse_stride).
template <typename T>
void PartialAttentionForward(const RowSet<const T>& q, const RowSet<const T>& k,
                             const RowSet<const T>& v, int64_t head_dim,
                             T scale, const TileMask& mask, T* out,
                             int64_t out_stride, T* lse, int64_t lse_stride,
                             AttentionScratch* scratch);

// Backward of one tile by recomputation: p = exp(s - lse) with the final
// lse, then dv += p^T do, dp = do v^T, ds = p * (dp - delta + dlse) (times
// the soft-cap's derivative 1 - (s / softcap)^2 of the capped s), dq +=
// scale ds k, dk += scale ds^T q. grad_out, lse, delta (rowsum of
// out * grad_out) and dlse (gradient of lse, may be null) are parallel to q;
// dq to q; dk, dv to k.
template <typename T>
void PartialAttentionBackward(
    const RowSet<const T>& q, const RowSet<const T>& k,
    const RowSet<const T>& v, int64_t head_dim, T scale, const TileMask& mask,
    const T* grad_out, int64_t grad_out_stride, const T* lse, const T* delta,
    const T* dlse, int64_t row_stat_stride, T* dq, int64_t dq_stride, T* dk,
    T* dv, int64_t dkv_stride, AttentionScratch* scratch);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_PARTIAL_ATTENTION_H_
