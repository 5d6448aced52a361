// The drivers that run the partial-attention primitive over every tile of a
// call, for one rank's query tokens against one chunk of key tokens. Tokens
// live in local buffers [batch, rows, heads, head_dim] that hold given spans
// of global positions (the whole sequence for single-rank attention; a
// rank's chunks in ring attention), so both paths share one kernel. Internal
// to attention/.
#ifndef LONGCTX_ATTENTION_ATTENTION_KERNEL_H_
#define LONGCTX_ATTENTION_ATTENTION_KERNEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "attention/attention.h"
#include "attention/tile_plan.h"
#include "distributed/sequence_parallel.h"

namespace lc {

// Global positions [begin, end) stored at local rows [row, row + end - begin).
struct LocalSpan {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t row = 0;
};

// The tokens of one local buffer.
struct TokenLayout {
  std::vector<LocalSpan> spans;
  int64_t rows = 0;  // total tokens
};

// Spans stored one after another, in order (empty spans dropped).
TokenLayout TokenLayoutOf(const std::vector<PositionSpan>& spans);

// Validated geometry and options of one call, shared by forward and
// backward.
struct AttentionProblem {
  int64_t batch = 0, n = 0, heads = 0, head_dim = 0;  // n: whole sequence
  double scale = 1;
  AttentionPattern pattern;
  int64_t max_patterns = 1;  // patterns of the head with the most
  TilePlanOptions plan;
  double dropout = 0;
  uint64_t dropout_seed = 0, dropout_offset = 0;
  Tensor key_padding;  // contiguous uint8 [batch, n], or undefined
};

// Checks q, k, v (one local buffer's [batch, rows, heads, head_dim], float32
// or float64 on the CPU), the pattern (for n tokens) and the options, and
// draws the dropout offset. Throws lc::Error naming the bad value.
std::shared_ptr<const AttentionProblem> MakeAttentionProblem(
    const Tensor& q, const Tensor& k, const Tensor& v, int64_t n,
    const AttentionPattern& pattern, const AttentionOptions& options);

// Whether any query of `q` may attend any key of `k` under the problem's
// pattern and causality.
bool HasTiles(const AttentionProblem& p, const TokenLayout& q,
              const TokenLayout& k);

// Merges the attention of q's tokens over k's into out ([batch, q rows,
// heads, head_dim]) and lse ([batch, heads, q rows]).
template <typename T>
void AttentionForwardTiles(const AttentionProblem& p, const TokenLayout& ql,
                           const T* q, const TokenLayout& kl, const T* k,
                           const T* v, T* out, T* lse);

// Adds the gradients of the pairs between q's tokens and k's into dq (like
// q) and dk, dv (like k). delta ([batch, heads, q rows]) is RowDelta's.
template <typename T>
void AttentionBackwardTiles(const AttentionProblem& p, const TokenLayout& ql,
                            const T* q, const TokenLayout& kl, const T* k,
                            const T* v, const T* grad_out, const T* lse,
                            const T* delta, const T* grad_lse, T* dq, T* dk,
                            T* dv);

// delta[b, h, t] = sum_c out[b, t, h, c] * grad_out[b, t, h, c] for a buffer
// of `rows` tokens.
template <typename T>
void RowDelta(const AttentionProblem& p, int64_t rows, const T* out,
              const T* grad_out, T* delta);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_KERNEL_H_
