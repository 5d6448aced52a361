// One description of an attention layer's pattern and options, shared by the
// multihead module, the factory and the command-line tool: the type (dense,
// dilated, block_sparse and their ring versions), the dilated and
// block-sparse parameters, causality, sliding window, soft-capping, scale,
// dropout, tile order and the CUDA backend.
#ifndef LONGCTX_ATTENTION_ATTENTION_CONFIG_H_
#define LONGCTX_ATTENTION_ATTENTION_CONFIG_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "attention/attention.h"
#include "attention/attention_plan.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "attention/tile_plan.h"
#include "distributed/communicator.h"
#include "distributed/sequence_parallel.h"

namespace lc {

enum class AttentionType {
  kDense,
  kDilated,
  kBlockSparse,
  kRingDilated,      // dilated, sequence-parallel over `ranks`
  kRingBlockSparse,  // block-sparse, sequence-parallel over `ranks`
};

// Parses dense, dilated, block_sparse, ring_dilated, ring_block_sparse.
absl::StatusOr<AttentionType> ParseAttentionType(const std::string& name);
std::string AttentionTypeName(AttentionType type);

// Parses auto, own, cudnn (AttentionBackend).
absl::StatusOr<AttentionBackend> ParseAttentionBackend(const std::string& name);

struct AttentionConfig {
  AttentionType type = AttentionType::kDilated;
  // Dilated patterns (dilated types). For block-sparse types, when
  // segment_lengths is non-empty the block mask is intersected with them.
  DilatedOptions dilated;
  BlockSparseOptions block_sparse;  // block-sparse types
  bool causal = false;
  // Sliding window and soft-capping, as AttentionOptions: keys u with
  // t - window_left <= u <= t + window_right (-1: that side unlimited),
  // intersected with the pattern; scores s become softcap * tanh(s /
  // softcap) when softcap > 0 (0: off).
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0;
  std::optional<double> scale;  // default 1 / sqrt(head_dim)
  double dropout = 0;           // attention dropout probability
  TileOrder tile_order = TileOrder::kRowMajor;
  // CUDA kernels of single-rank attention (the ring runs ours) and whether
  // gradients must be bit-reproducible (AttentionOptions).
  AttentionBackend backend = AttentionBackend::kAuto;
  bool deterministic = false;
  int64_t ranks = 1;  // ring types: ranks of the sequence-parallel group
  SequenceLayout layout = SequenceLayout::kContiguous;  // ring types
};

// Where this rank's tokens sit in a sequence-parallel group: its
// communicator (of config.ranks ranks) and the whole sequence's length. The
// rank holds RankSpans(n, ranks, rank, config.layout) of the tokens.
struct SequenceParallelContext {
  Communicator* comm = nullptr;
  int64_t n = 0;
  RingStats* stats = nullptr;  // optional, see RingOptions
};

// Checks the options that do not depend on the input (lists, rates,
// probabilities, windows, the soft cap, ranks: more than one only for ring
// types); errors name the value and what was expected.
absl::Status ValidateAttentionConfig(const AttentionConfig& config);

// The per-head pattern of `config` for `heads` heads over n tokens.
absl::StatusOr<AttentionPattern> BuildAttentionPattern(
    const AttentionConfig& config, int64_t heads, int64_t n);

// AttentionOptions for Attention() from `config` (dropout only while
// training).
AttentionOptions MakeAttentionOptions(const AttentionConfig& config,
                                      bool training);

// The plan of `config`'s attention for this rank's inputs ([batch, n_local,
// heads, head_dim]; see AttentionPlan): for ring types given a context `sp`,
// a ring plan over sp's communicator and sequence of sp->n tokens
// (collective: every rank makes it together); else a one-rank plan over
// n_local tokens (ring types without a context run on one rank). Dropout
// only when `training`. Throws lc::Error on bad input, including a context
// whose group size is not config.ranks.
std::shared_ptr<const AttentionPlan> MakeAttentionPlan(
    const AttentionConfig& config, const TensorSpec& inputs, bool training,
    const SequenceParallelContext* sp = nullptr);

// One call of the plan of `config` made for q: MakeAttentionPlan(config,
// SpecOf(q), training, sp)->Run(q, k, v, call) (call.key_padding_mask is
// then the whole sequence's [batch, n]).
AttentionResult RunAttention(const AttentionConfig& config, const Tensor& q,
                             const Tensor& k, const Tensor& v, bool training,
                             const AttentionCallOptions& call = {},
                             const SequenceParallelContext* sp = nullptr);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_CONFIG_H_
