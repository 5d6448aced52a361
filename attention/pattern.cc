#include "attention/pattern.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/random.h"

namespace lc {

absl::StatusOr<HeadLayout> ParseHeadLayout(const std::string& name) {
  if (name == "head_groups") return HeadLayout::kHeadGroups;
  if (name == "all_heads") return HeadLayout::kAllHeads;
  return absl::InvalidArgumentError(absl::StrCat(
      "head layout \"", name, "\" (expected head_groups or all_heads)"));
}

absl::StatusOr<std::vector<std::vector<DilatedPattern>>> DilatedHeadPatterns(
    const DilatedOptions& options, int64_t num_heads) {
  const auto& w = options.segment_lengths;
  const auto& r = options.dilation_rates;
  if (w.empty()) {
    return absl::InvalidArgumentError(
        "segment_lengths is empty (expected at least one segment length)");
  }
  if (w.size() != r.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "segment_lengths [", absl::StrJoin(w, ","), "] and dilation_rates [",
        absl::StrJoin(r, ","), "] have different lengths (", w.size(), " vs ",
        r.size(), "; expected one rate per segment length)"));
  }
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "segment length ", w[i], " at index ", i, " (expected >= 1)"));
    }
    if (r[i] < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dilation rate ", r[i], " at index ", i, " (expected >= 1)"));
    }
  }
  if (num_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_heads ", num_heads, " (expected >= 1)"));
  }
  const int64_t groups = static_cast<int64_t>(w.size());
  std::vector<std::vector<DilatedPattern>> heads(num_heads);
  if (options.head_layout == HeadLayout::kAllHeads) {
    for (int64_t j = 0; j < num_heads; ++j) {
      for (int64_t i = 0; i < groups; ++i) {
        heads[j].push_back({w[i], r[i], j % r[i]});
      }
    }
    return heads;
  }
  const int64_t base = num_heads / groups, extra = num_heads % groups;
  int64_t head = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = base + (g < extra ? 1 : 0);
    for (int64_t k = 0; k < size; ++k, ++head) {
      heads[head].push_back({w[g], r[g], g % r[g]});
    }
  }
  return heads;
}

DilatedPattern DensePattern(int64_t n) {
  return DilatedPattern{n > 0 ? n : 1, 1, 0};
}

BlockMask::BlockMask(int64_t block_size, int64_t num_blocks)
    : block_size_(block_size),
      num_blocks_(num_blocks),
      bits_(num_blocks * num_blocks, 0) {}

double BlockMask::Density() const {
  if (bits_.empty()) return 0;
  int64_t on = 0;
  for (uint8_t b : bits_) on += b;
  return static_cast<double>(on) / bits_.size();
}

absl::StatusOr<SparsePattern> ParseSparsePattern(const std::string& name) {
  if (name == "local_window") return SparsePattern::kLocalWindow;
  if (name == "dilated_sparse") return SparsePattern::kDilatedSparse;
  if (name == "global_local") return SparsePattern::kGlobalLocal;
  if (name == "random") return SparsePattern::kRandom;
  if (name == "explicit") return SparsePattern::kExplicit;
  return absl::InvalidArgumentError(absl::StrCat(
      "sparse pattern \"", name,
      "\" (expected local_window, dilated_sparse, global_local, random or "
      "explicit)"));
}

absl::StatusOr<BlockMask> MakeBlockMask(const BlockSparseOptions& options,
                                        int64_t n) {
  const int64_t bs = options.block_size;
  if (bs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size ", bs, " (expected >= 1)"));
  }
  if (n < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence length ", n, " (expected >= 1)"));
  }
  const int64_t blocks = (n + bs - 1) / bs;
  BlockMask mask(bs, blocks);
  const int64_t window_blocks = (options.window + bs - 1) / bs;
  switch (options.pattern) {
    case SparsePattern::kLocalWindow:
    case SparsePattern::kGlobalLocal: {
      if (options.window < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("window ", options.window, " (expected >= 0)"));
      }
      int64_t global_blocks = 0;
      if (options.pattern == SparsePattern::kGlobalLocal) {
        if (options.global_tokens < 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "global_tokens ", options.global_tokens, " (expected >= 0)"));
        }
        global_blocks = (options.global_tokens + bs - 1) / bs;
      }
      for (int64_t q = 0; q < blocks; ++q) {
        for (int64_t k = 0; k < blocks; ++k) {
          mask.set(q, k,
                   std::llabs(q - k) <= window_blocks || q < global_blocks ||
                       k < global_blocks);
        }
      }
      break;
    }
    case SparsePattern::kDilatedSparse:
      if (options.stride < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("stride ", options.stride, " (expected >= 1)"));
      }
      for (int64_t q = 0; q < blocks; ++q) {
        for (int64_t k = 0; k < blocks; ++k) {
          mask.set(q, k, std::llabs(q - k) % options.stride == 0);
        }
      }
      break;
    case SparsePattern::kRandom:
      if (!(options.density >= 0 && options.density <= 1)) {
        return absl::InvalidArgumentError(
            absl::StrCat("density ", options.density, " (expected in [0, 1])"));
      }
      for (int64_t q = 0; q < blocks; ++q) {
        for (int64_t k = 0; k < blocks; ++k) {
          const double u = UniformAt(options.seed, 0, q * blocks + k);
          mask.set(q, k, q == k || u < options.density);
        }
      }
      break;
    case SparsePattern::kExplicit:
      if (static_cast<int64_t>(options.explicit_mask.size()) !=
          blocks * blocks) {
        return absl::InvalidArgumentError(absl::StrCat(
            "explicit block mask has ", options.explicit_mask.size(),
            " entries (expected ", blocks, " x ", blocks, " = ",
            blocks * blocks, " for n = ", n, " and block_size ", bs, ")"));
      }
      for (int64_t q = 0; q < blocks; ++q) {
        for (int64_t k = 0; k < blocks; ++k) {
          mask.set(q, k, options.explicit_mask[q * blocks + k] != 0);
        }
      }
      break;
  }
  return mask;
}

}  // namespace lc
