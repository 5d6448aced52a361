#include "attention/pattern.h"

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/check.h"
#include "core/random.h"

namespace lc {

int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

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

DilatedPattern DilatedPattern::Within(int64_t n) const {
  if (segment_length < 1 || dilation_rate < 1 || offset < 0 ||
      offset >= dilation_rate) {
    return *this;
  }
  // Positions below n lie in segment 0 of any w >= n, with t mod w = t.
  const int64_t w = std::min(segment_length, std::max<int64_t>(n, 1));
  // t mod w < w: with r >= w, (t mod w) mod r = t mod w, which equals o for
  // o < w only; r = w keeps that rule.
  if (offset >= w) return DilatedPattern{w, w + 1, w};  // selects nothing
  return DilatedPattern{w, std::min(dilation_rate, w), offset};
}

std::vector<std::vector<DilatedPattern>> PatternsWithin(
    std::vector<std::vector<DilatedPattern>> head_patterns, int64_t n) {
  for (std::vector<DilatedPattern>& patterns : head_patterns) {
    for (DilatedPattern& p : patterns) p = p.Within(n);
  }
  return head_patterns;
}

BlockMask::BlockMask(
    int64_t block_size, int64_t num_blocks,
    absl::FunctionRef<void(int64_t, std::vector<int32_t>*)> row)
    : block_size_(block_size), num_blocks_(num_blocks) {
  LC_CHECK(block_size >= 1 && num_blocks >= 0 &&
           num_blocks <= std::numeric_limits<int32_t>::max())
      << block_size << " " << num_blocks;
  row_begin_.reserve(num_blocks + 1);
  for (int64_t q = 0; q < num_blocks; ++q) {
    const size_t begin = keys_.size();
    row(q, &keys_);
    for (size_t i = begin; i < keys_.size(); ++i) {
      LC_CHECK(keys_[i] >= 0 && keys_[i] < num_blocks &&
               (i == begin || keys_[i] > keys_[i - 1]))
          << "row " << q << ": key block " << keys_[i] << " (expected "
          << "increasing blocks below " << num_blocks << ")";
    }
    row_begin_.push_back(static_cast<int64_t>(keys_.size()));
  }
}

BlockMask BlockMask::FromPairs(int64_t block_size, int64_t num_blocks,
                               absl::FunctionRef<bool(int64_t, int64_t)> on) {
  return BlockMask(block_size, num_blocks,
                   [&](int64_t q, std::vector<int32_t>* keys) {
                     for (int64_t k = 0; k < num_blocks; ++k) {
                       if (on(q, k)) keys->push_back(static_cast<int32_t>(k));
                     }
                   });
}

bool BlockMask::on(int64_t query_block, int64_t key_block) const {
  const absl::Span<const int32_t> row = Row(query_block);
  return std::binary_search(row.begin(), row.end(), key_block);
}

double BlockMask::Density() const {
  if (num_blocks_ == 0) return 0;
  return static_cast<double>(OnPairs()) / (num_blocks_ * num_blocks_);
}

std::vector<uint8_t> BlockMask::ToDense() const {
  std::vector<uint8_t> bits(num_blocks_ * num_blocks_, 0);
  for (int64_t q = 0; q < num_blocks_; ++q) {
    for (int32_t k : Row(q)) bits[q * num_blocks_ + k] = 1;
  }
  return bits;
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
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size ", options.block_size, " (expected >= 1)"));
  }
  if (n < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence length ", n, " (expected >= 1)"));
  }
  // A block longer than the sequence is all of it: the one block pair is
  // the diagonal, which every rule turns on, and block_size <= n keeps the
  // block arithmetic of every user of the mask below 2n.
  const int64_t bs = std::min(options.block_size, n);
  const int64_t blocks = CeilDiv(n, bs);
  if (blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block_size ", bs, " cuts sequence length ", n, " into ", blocks,
        " blocks (expected at most ", std::numeric_limits<int32_t>::max(),
        ": a larger block_size)"));
  }
  switch (options.pattern) {
    case SparsePattern::kLocalWindow:
    case SparsePattern::kGlobalLocal: {
      if (options.window < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("window ", options.window, " (expected >= 0)"));
      }
      // A window of blocks or more reaches every block (and q +
      // window_blocks + 1 stays below 2 blocks).
      const int64_t window_blocks =
          std::min(CeilDiv(options.window, bs), blocks);
      int64_t global_blocks = 0;
      if (options.pattern == SparsePattern::kGlobalLocal) {
        if (options.global_tokens < 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "global_tokens ", options.global_tokens, " (expected >= 0)"));
        }
        global_blocks = std::min(CeilDiv(options.global_tokens, bs), blocks);
      }
      // Pair (q, k) is on when |q - k| <= window_blocks, q < global_blocks
      // or k < global_blocks: the global keys, then the window past them.
      return BlockMask(bs, blocks, [&](int64_t q, std::vector<int32_t>* keys) {
        const int64_t window_begin =
            q < global_blocks ? 0 : std::max<int64_t>(0, q - window_blocks);
        const int64_t window_end =
            q < global_blocks ? blocks
                              : std::min(blocks, q + window_blocks + 1);
        for (int64_t k = 0; k < std::min(global_blocks, window_begin); ++k) {
          keys->push_back(static_cast<int32_t>(k));
        }
        for (int64_t k = window_begin; k < window_end; ++k) {
          keys->push_back(static_cast<int32_t>(k));
        }
      });
    }
    case SparsePattern::kDilatedSparse: {
      if (options.stride < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("stride ", options.stride, " (expected >= 1)"));
      }
      // |q - k| % stride == 0: every stride-th block from q % stride. A
      // stride of blocks or more leaves the diagonal alone (and k + stride
      // stays below 2 blocks).
      const int64_t stride = std::min(options.stride, blocks);
      return BlockMask(bs, blocks, [&](int64_t q, std::vector<int32_t>* keys) {
        for (int64_t k = q % stride; k < blocks; k += stride) {
          keys->push_back(static_cast<int32_t>(k));
        }
      });
    }
    case SparsePattern::kRandom:
      if (!(options.density >= 0 && options.density <= 1)) {
        return absl::InvalidArgumentError(
            absl::StrCat("density ", options.density, " (expected in [0, 1])"));
      }
      return BlockMask::FromPairs(bs, blocks, [&](int64_t q, int64_t k) {
        return q == k ||
               UniformAt(options.seed, 0, q * blocks + k) < options.density;
      });
    case SparsePattern::kExplicit:
      if (static_cast<int64_t>(options.explicit_mask.size()) !=
          blocks * blocks) {
        return absl::InvalidArgumentError(absl::StrCat(
            "explicit block mask has ", options.explicit_mask.size(),
            " entries (expected ", blocks, " x ", blocks, " = ",
            blocks * blocks, " for n = ", n, " and block_size ",
            options.block_size, ")"));
      }
      return BlockMask::FromPairs(bs, blocks, [&](int64_t q, int64_t k) {
        return options.explicit_mask[q * blocks + k] != 0;
      });
  }
  LC_CHECK(false) << "unknown sparse pattern "
                  << static_cast<int>(options.pattern);
  return BlockMask();
}

}  // namespace lc
