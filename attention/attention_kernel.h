// The CPU drivers that run the partial-attention primitive over every tile
// of a call, for one rank's query tokens against one chunk of key tokens.
// Tokens live in local buffers [batch, rows, heads, head_dim] that hold given
// spans of global positions (the whole sequence for single-rank attention; a
// rank's chunks in ring attention), or, for keys, in packed per-head buffers
// of only the rows a ring step uses, so every path shares one kernel.
// Internal to attention/.
#ifndef LONGCTX_ATTENTION_ATTENTION_KERNEL_H_
#define LONGCTX_ATTENTION_ATTENTION_KERNEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "attention/attention_options.h"
#include "attention/tile_plan.h"
#include "distributed/ring_exchange.h"
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

class CudaWorkLists;  // attention_cuda_plan.h

// NOTE [ Problem and call ]
// An attention plan (attention_plan.h) keeps one AttentionProblem: the
// validated shapes, pattern and options of every call it serves, and what
// the drivers build from them once (the CUDA work lists of the layouts the
// plan prepared). Each call adds an AttentionCall: the dropout stream drawn
// for it and the key padding mask. The drivers take both; nothing of a call
// is stored in the problem, so one problem serves calls on any thread.
struct AttentionProblem {
  int64_t batch = 0, n = 0, heads = 0, head_dim = 0;  // n: whole sequence
  int64_t rows = 0;               // tokens of each input buffer (n on one rank)
  DType dtype = DType::kFloat32;  // of the caller's q, k, v
  Device device = Device::Cpu();
  double scale = 1;
  AttentionPattern pattern;  // segment lengths and rates below 2n
  int64_t max_patterns = 1;  // patterns of the head with the most
  TilePlanOptions plan;      // causality and the window are the plan's
  double dropout = 0;
  double softcap = 0;  // > 0: scores become softcap * tanh(s / softcap)
  // CUDA problems: the kernels' work lists, built when the plan prepares a
  // pair of layouts. Null on the CPU.
  std::shared_ptr<CudaWorkLists> cuda_work_lists;
};

// One call's state.
struct AttentionCall {
  uint64_t dropout_seed = 0, dropout_offset = 0;  // dropout > 0 only
  // Contiguous uint8 [batch, n] on the problem's device, or undefined.
  Tensor key_padding;
};

// Checks the inputs a plan is made for (one local buffer's [batch, rows,
// heads, head_dim] of float32, float64 or bfloat16 on the CPU or a CUDA
// device, head_dim <= 256 on CUDA), the pattern (for n tokens) and the
// options. Throws lc::Error naming the bad value.
std::shared_ptr<AttentionProblem> MakeAttentionProblem(
    const TensorSpec& inputs, int64_t n, const AttentionPattern& pattern,
    const AttentionOptions& options);

// Checks that q, k, v are defined inputs of `expected` (a plan's inputs;
// `op` names the caller in the error).
void CheckAttentionInputs(const char* op, const TensorSpec& expected,
                          const Tensor& q, const Tensor& k, const Tensor& v);

// Checks the call options against p (a generator when p has dropout, the
// padding mask's shape and dtype) and draws the dropout offset.
AttentionCall MakeAttentionCall(const char* op, const AttentionProblem& p,
                                const AttentionCallOptions& call);

// Checks a key padding mask (when defined) of a call over n tokens: uint8
// [batch, n]. Throws lc::Error naming it.
void CheckKeyPaddingMask(const char* op, const Tensor& mask, int64_t batch,
                         int64_t n);

// The CPU tile drivers (float32 or float64; attention_driver.h runs them).
// Merges the attention of q's tokens (a shared layout) over k's (either
// form) into out ([batch, q rows, heads, head_dim]) and lse ([batch, heads,
// q rows]).
template <typename T>
void AttentionForwardTiles(const AttentionProblem& p, const AttentionCall& call,
                           const TokenLayout& ql, const T* q,
                           const TokenLayout& kl, const T* k, const T* v,
                           T* out, T* lse);

// Adds the gradients of the pairs between q's tokens and k's into dq (like
// q) and dk, dv (like k). delta ([batch, heads, q rows]) is RowDelta's.
template <typename T>
void AttentionBackwardTiles(const AttentionProblem& p,
                            const AttentionCall& call, const TokenLayout& ql,
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
