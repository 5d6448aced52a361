// The drivers that run the partial-attention primitive over every tile of a
// call, for one rank's query tokens against one chunk of key tokens. Tokens
// live in local buffers [batch, rows, heads, head_dim] that hold given spans
// of global positions (the whole sequence for single-rank attention; a
// rank's chunks in ring attention), or, for keys, in packed per-head buffers
// of only the rows a ring step uses, so every path shares one kernel.
// Internal to attention/.
#ifndef LONGCTX_ATTENTION_ATTENTION_KERNEL_H_
#define LONGCTX_ATTENTION_ATTENTION_KERNEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "attention/attention.h"
#include "attention/tile_plan.h"
#include "distributed/sequence_parallel.h"

namespace lc {

// Global positions begin, begin + step, ... (< end) stored at local rows
// row, row + 1, .... With pattern >= 0 the span holds keys of that pattern
// of its head only (positions the pattern selects, in one of its segments)
// and only that pattern visits them; with -1 it serves every pattern.
struct LocalSpan {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t row = 0;
  int64_t step = 1;
  int pattern = -1;
  int64_t RowOf(int64_t position) const {
    return row + (position - begin) / step;
  }
};

// The tokens of one local buffer, in one of two forms:
//  - shared: every head holds `spans`, in a [batch, rows, heads, head_dim]
//    buffer (a rank's tokens, or the whole sequence);
//  - packed (key chunks that ring attention cut down to the rows their
//    receivers use): head h holds head_spans[h], whose local rows count
//    from 0, at rows head_row[h] + 0, 1, ... of a [batch, rows, head_dim]
//    buffer.
struct TokenLayout {
  std::vector<LocalSpan> spans;
  int64_t rows = 0;  // total tokens (packed: total rows of all heads)
  std::vector<std::vector<LocalSpan>> head_spans;  // packed form only
  std::vector<int64_t> head_row;                   // packed form only

  bool packed() const { return !head_spans.empty(); }
  const std::vector<LocalSpan>& SpansOf(int64_t h) const {
    return packed() ? head_spans[h] : spans;
  }
  // Element offset of local row `row` of head h of batch b, and elements
  // between consecutive rows, for tokens of heads x head_dim.
  int64_t Offset(int64_t heads, int64_t head_dim, int64_t b, int64_t h,
                 int64_t row) const {
    return packed() ? (b * rows + head_row[h] + row) * head_dim
                    : ((b * rows + row) * heads + h) * head_dim;
  }
  int64_t RowStride(int64_t heads, int64_t head_dim) const {
    return packed() ? head_dim : heads * head_dim;
  }
};

// Spans stored one after another, in order (empty spans dropped).
TokenLayout TokenLayoutOf(const std::vector<PositionSpan>& spans);

// Whether `later`, a layout of a K/V chunk at a later step of its ring trip
// than `earlier`, holds the same keys. A trip's layouts only ever drop keys
// (each holds the keys its remaining holders use), so equal forms and row
// counts mean equal keys: the ring decides from that alone whether gradient
// accumulators travel on. The subset property this relies on is checked:
// equal counts of different keys abort (LC_CHECK) naming both layouts. The
// check is O(spans), sorting them only when the two lists of spans differ.
bool SameKeys(const TokenLayout& earlier, const TokenLayout& later);

class CudaPlanCache;  // attention_cuda_plan.h

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
  // Contiguous uint8 [batch, n] on the device of q, or undefined.
  Tensor key_padding;
  // CUDA problems: the kernels' work lists, shared by every call of the
  // problem (forward, backward, ring steps). Null on the CPU.
  std::shared_ptr<CudaPlanCache> cuda_plans;
};

// Checks q, k, v (one local buffer's [batch, rows, heads, head_dim] on one
// device: float32 or float64 on the CPU, where the caller converts bfloat16;
// float32, float64 or bfloat16 on CUDA, head_dim <= 256), the pattern (for n
// tokens) and the options, and draws the dropout offset. The key padding
// mask may live on any device; the problem keeps a copy on q's device.
// Throws lc::Error naming the bad value.
std::shared_ptr<const AttentionProblem> MakeAttentionProblem(
    const Tensor& q, const Tensor& k, const Tensor& v, int64_t n,
    const AttentionPattern& pattern, const AttentionOptions& options);

// Merges the attention of q's tokens (a shared layout) over k's (either
// form) into out ([batch, q rows, heads, head_dim]) and lse ([batch, heads,
// q rows]).
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

// The CUDA drivers: the same contracts on contiguous CUDA tensors of the
// problem's device. q, k, v (and grad_out) are of the inputs' dtype
// (bfloat16, float32 or float64), buffers of their layouts (q's shared:
// [batch, rows, heads, head_dim]; k's shared: [batch, rows, heads,
// head_dim], or packed: [batch, rows, head_dim]); out_acc, lse, delta, grad_lse
// and the gradients are in the accumulator dtype (float64 for float64 inputs,
// float32 otherwise). Work is queued on the current stream of the device;
// results are merged or added into the accumulators (so several calls compose:
// ring steps, patterns), in an order fixed by the plan (bit-identical results
// for equal inputs). For bfloat16 inputs with one pattern per head, out_acc
// (and dq, dk, dv together) may instead be bfloat16: the kernels then write
// each row once (rows without pairs keep their values), for a call that is the
// only one contributing to those buffers (lse stays float32 and is written
// too).
void AttentionForwardTilesCuda(const AttentionProblem& p, const TokenLayout& ql,
                               const Tensor& q, const TokenLayout& kl,
                               const Tensor& k, const Tensor& v,
                               const Tensor& out_acc, const Tensor& lse);

void AttentionBackwardTilesCuda(const AttentionProblem& p,
                                const TokenLayout& ql, const Tensor& q,
                                const TokenLayout& kl, const Tensor& k,
                                const Tensor& v, const Tensor& grad_out,
                                const Tensor& lse, const Tensor& delta,
                                const Tensor& grad_lse, const Tensor& dq_acc,
                                const Tensor& dk_acc, const Tensor& dv_acc);

// delta ([batch, heads, rows], accumulator dtype) = RowDelta of out and
// grad_out (the inputs' dtype).
void RowDeltaCuda(const AttentionProblem& p, int64_t rows, const Tensor& out,
                  const Tensor& grad_out, const Tensor& delta);

// The accumulator dtype of the CUDA drivers for inputs of `dtype`.
DType CudaAccumulatorDType(DType dtype);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_KERNEL_H_
