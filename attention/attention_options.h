// What an attention call is made of, shared by every attention entry point
// (Attention, RingAttention, AttentionPlan, the kernels beneath them): the
// pattern, the options a plan is made for, the options of each call, and
// the result.
#ifndef LONGCTX_ATTENTION_ATTENTION_OPTIONS_H_
#define LONGCTX_ATTENTION_ATTENTION_OPTIONS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "attention/pattern.h"
#include "attention/tile_plan.h"
#include "core/random.h"
#include "core/tensor.h"

namespace lc {

// Which pairs each head attends: its dilated patterns (dense attention is
// DensePattern(n) for every head), optionally intersected with a block mask.
struct AttentionPattern {
  std::vector<std::vector<DilatedPattern>> head_patterns;  // [heads][...]
  std::shared_ptr<const BlockMask> block_mask;             // may be null
};

// Which kernels run attention on a CUDA device (the CPU has one path).
enum class AttentionBackend {
  // cuDNN's fused flash attention where it applies (bfloat16, head_dim a
  // multiple of 8 up to 128, one dilated pattern per head whose segment
  // length divides n, no block mask, dropout or padding mask) and has an
  // engine and workspace, else ours. The backward runs on ours too for a
  // gradient through lse (cuDNN's takes none) or when `deterministic`.
  kAuto,
  kOwn,    // our fused kernels (attention_cuda.h) for every call
  kCudnn,  // cuDNN only: calls it cannot run are an error naming why
};

// What a plan is built for (attention_plan.h): fixed for every call of it.
struct AttentionOptions {
  bool causal = false;
  std::optional<double> scale;  // default 1 / sqrt(head_dim)
  // Attention dropout probability in [0, 1), applied to the attention
  // probabilities with the counter-based stream of the call's generator
  // (AttentionCallOptions): one offset per call.
  double dropout = 0;
  // Sliding window (FlashAttention's window_size): query t attends only keys
  // u with t - window_left <= u <= t + window_right, intersected with the
  // pattern, causality and the masks; -1 leaves that side unlimited.
  int64_t window_left = -1;
  int64_t window_right = -1;
  // Soft-capping (Gemma 2): with softcap > 0 every score s becomes
  // softcap * tanh(s / softcap) before the softmax; 0 is off.
  double softcap = 0;
  TileOrder tile_order = TileOrder::kRowMajor;
  int64_t query_tile = 128;  // rows per tile (block-sparse: one block)
  int64_t key_tile = 256;
  AttentionBackend backend = AttentionBackend::kAuto;
  // Bit-reproducible gradients on CUDA: cuDNN's backward adds dq with
  // atomics, so with kAuto the backward then runs on our kernels, which
  // always are. Attention refuses kCudnn with deterministic before running
  // anything, on every device.
  bool deterministic = false;
};

// What changes from one call of a plan to the next.
struct AttentionCallOptions {
  // The stream attention dropout draws from (its seed and next offset);
  // required when the options' dropout is above 0, never implied.
  Generator* generator = nullptr;
  // uint8 [batch, n]: nonzero marks a padding key that gets no weight (the
  // PyTorch convention). Undefined for none. On the CPU or the inputs'
  // device.
  Tensor key_padding_mask;
};

struct AttentionResult {
  Tensor out;  // [batch, n, heads, head_dim], the dtype of q
  Tensor lse;  // [batch, heads, n], float32 (float64 for float64 inputs);
               // -inf where a query has no allowed key (its out row is 0),
               // +inf where a score is +inf (+inf in q or k: its out row is
               // NaN, as in a float64 softmax)
};

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_OPTIONS_H_
