#include "attention/attention_config.h"

#include <cmath>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace lc {

absl::StatusOr<AttentionType> ParseAttentionType(const std::string& name) {
  for (AttentionType t :
       {AttentionType::kDense, AttentionType::kDilated,
        AttentionType::kBlockSparse, AttentionType::kRingDilated,
        AttentionType::kRingBlockSparse}) {
    if (name == AttentionTypeName(t)) return t;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("attention type \"", name,
                   "\" (expected dense, dilated, block_sparse, ring_dilated or "
                   "ring_block_sparse)"));
}

absl::StatusOr<AttentionBackend> ParseAttentionBackend(
    const std::string& name) {
  if (name == "auto") return AttentionBackend::kAuto;
  if (name == "own") return AttentionBackend::kOwn;
  if (name == "cudnn") return AttentionBackend::kCudnn;
  return absl::InvalidArgumentError(absl::StrCat(
      "attention backend \"", name, "\" (expected auto, own or cudnn)"));
}

std::string AttentionTypeName(AttentionType type) {
  switch (type) {
    case AttentionType::kDense:
      return "dense";
    case AttentionType::kDilated:
      return "dilated";
    case AttentionType::kBlockSparse:
      return "block_sparse";
    case AttentionType::kRingDilated:
      return "ring_dilated";
    case AttentionType::kRingBlockSparse:
      return "ring_block_sparse";
  }
  return "unknown";
}

namespace {

bool IsDilatedType(AttentionType t) {
  return t == AttentionType::kDilated || t == AttentionType::kRingDilated;
}
bool IsBlockSparseType(AttentionType t) {
  return t == AttentionType::kBlockSparse ||
         t == AttentionType::kRingBlockSparse;
}
bool IsRingType(AttentionType t) {
  return t == AttentionType::kRingDilated ||
         t == AttentionType::kRingBlockSparse;
}

}  // namespace

absl::Status ValidateAttentionConfig(const AttentionConfig& config) {
  if (IsDilatedType(config.type) || (IsBlockSparseType(config.type) &&
                                     !config.dilated.segment_lengths.empty())) {
    // Validates the lists; one head is enough to see every error.
    LC_RETURN_IF_ERROR(DilatedHeadPatterns(config.dilated, 1).status());
  }
  if (IsBlockSparseType(config.type)) {
    // A one-block sequence checks every option except an explicit mask's
    // size, which depends on n.
    BlockSparseOptions probe = config.block_sparse;
    if (probe.pattern == SparsePattern::kExplicit) probe.explicit_mask = {1};
    LC_RETURN_IF_ERROR(MakeBlockMask(probe, 1).status());
  }
  if (!(config.dropout >= 0 && config.dropout < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention dropout ", config.dropout, " (expected in [0, 1))"));
  }
  for (const auto& [side, window] :
       {std::pair{"window_left", config.window_left},
        std::pair{"window_right", config.window_right}}) {
    if (window < -1) {
      return absl::InvalidArgumentError(
          absl::StrCat("attention ", side, " ", window,
                       " (expected >= 0, or -1 for unlimited)"));
    }
  }
  if (!std::isfinite(config.softcap) || config.softcap < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention softcap ", config.softcap,
                     " (expected a finite number > 0, or 0 for none)"));
  }
  if (config.scale.has_value() && !(*config.scale == *config.scale)) {
    return absl::InvalidArgumentError("attention scale is NaN");
  }
  if (config.ranks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ranks ", config.ranks, " (expected >= 1)"));
  }
  if (config.ranks > 1 && !IsRingType(config.type)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ranks ", config.ranks, " with attention type ",
        AttentionTypeName(config.type),
        " (only ring_dilated and ring_block_sparse run on several ranks)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionPattern> BuildAttentionPattern(
    const AttentionConfig& config, int64_t heads, int64_t n) {
  LC_RETURN_IF_ERROR(ValidateAttentionConfig(config));
  if (n < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence length ", n, " (expected >= 1)"));
  }
  AttentionPattern pattern;
  const bool dilated =
      IsDilatedType(config.type) || !config.dilated.segment_lengths.empty();
  if (dilated && config.type != AttentionType::kDense) {
    LC_ASSIGN_OR_RETURN(pattern.head_patterns,
                        DilatedHeadPatterns(config.dilated, heads));
  } else {
    pattern.head_patterns.assign(heads, {DensePattern(n)});
  }
  if (IsBlockSparseType(config.type)) {
    LC_ASSIGN_OR_RETURN(BlockMask mask, MakeBlockMask(config.block_sparse, n));
    pattern.block_mask = std::make_shared<const BlockMask>(std::move(mask));
  }
  return pattern;
}

AttentionOptions MakeAttentionOptions(const AttentionConfig& config,
                                      bool training) {
  AttentionOptions options;
  options.causal = config.causal;
  options.window_left = config.window_left;
  options.window_right = config.window_right;
  options.softcap = config.softcap;
  options.scale = config.scale;
  options.dropout = training ? config.dropout : 0.0;
  options.tile_order = config.tile_order;
  options.backend = config.backend;
  options.deterministic = config.deterministic;
  return options;
}

std::shared_ptr<const AttentionPlan> MakeAttentionPlan(
    const AttentionConfig& config, const TensorSpec& inputs, bool training,
    const SequenceParallelContext* sp) {
  LC_REQUIRE(inputs.shape.size() == 4, "attention: q has shape ",
             ShapeToString(inputs.shape),
             " (expected [batch, n, heads, head_dim])");
  const bool ring = IsRingType(config.type) && sp != nullptr;
  if (ring) {
    LC_REQUIRE(sp->comm != nullptr && sp->comm->size() == config.ranks,
               "attention: the sequence-parallel group has ",
               sp->comm != nullptr ? sp->comm->size() : 0,
               " ranks but the config says ranks = ", config.ranks);
  } else {
    LC_REQUIRE(config.ranks == 1, "attention: ", config.ranks,
               " ranks need a sequence-parallel context (a communicator)");
  }
  const int64_t n = ring ? sp->n : inputs.shape[1];
  absl::StatusOr<AttentionPattern> pattern =
      BuildAttentionPattern(config, inputs.shape[2], n);
  ThrowIfError(pattern.status());
  const AttentionOptions options = MakeAttentionOptions(config, training);
  if (!ring) return MakeAttentionPlan(inputs, *pattern, options);
  RingOptions ring_options;
  ring_options.layout = config.layout;
  ring_options.stats = sp->stats;
  return MakeRingAttentionPlan(*sp->comm, inputs, n, *pattern, options,
                               ring_options);
}

AttentionResult RunAttention(const AttentionConfig& config, const Tensor& q,
                             const Tensor& k, const Tensor& v, bool training,
                             const AttentionCallOptions& call,
                             const SequenceParallelContext* sp) {
  LC_REQUIRE(q.defined() && q.dim() == 4, "RunAttention: q has shape ",
             q.defined() ? ShapeToString(q.shape()) : "undefined",
             " (expected [batch, n, heads, head_dim])");
  return MakeAttentionPlan(config, SpecOf(q), training, sp)->Run(q, k, v, call);
}

}  // namespace lc
