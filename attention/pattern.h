// Attention patterns: which key positions each query position attends to,
// per head. A pattern is the exact semantics of ../shared/SPEC.md section 2:
//  - dilated patterns (w, r, o): t and u in the same segment of length w,
//    both selected by (pos mod w) mod r == o; several per head, each (t, u)
//    pair counted once per pattern that allows it; heads get patterns in the
//    "head groups" or "all heads" layout;
//  - a block mask over (query block, key block) pairs, intersected with the
//    dilated patterns (block-sparse attention is the dense pattern plus a
//    block mask);
//  - causality (u <= t) and a key padding mask are options of the op.
#ifndef LONGCTX_ATTENTION_PATTERN_H_
#define LONGCTX_ATTENTION_PATTERN_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lc {

// ceil(a / b) for a >= 0 and b >= 1, for any such values (a + b - 1
// overflows for b near INT64_MAX).
int64_t CeilDiv(int64_t a, int64_t b);

struct DilatedPattern {
  int64_t segment_length = 0;  // w >= 1
  int64_t dilation_rate = 1;   // r >= 1
  int64_t offset = 0;          // 0 <= o < r

  // Whether position t is selected: (t mod w) mod r == o.
  bool Selects(int64_t t) const {
    return (t % segment_length) % dilation_rate == offset;
  }
  // Whether query t attends key u (without causality).
  bool Allows(int64_t t, int64_t u) const {
    return Selects(t) && Selects(u) && t / segment_length == u / segment_length;
  }
  // The pattern that allows the same pairs among positions 0..n-1 with
  // w <= n and r <= w + 1: a segment longer than n is all of it, and a rate
  // above w selects t mod w == o alone (nothing when o >= w). Any w, r and o
  // a user gives may be near INT64_MAX; this form keeps every position the
  // kernels compute from them (o + j r, s w + w, (x + r - 1) / r) below 2n.
  // A pattern that is not valid (w < 1, r < 1, o outside [0, r)) is
  // returned as is, for its user's check to name.
  DilatedPattern Within(int64_t n) const;
};

enum class HeadLayout {
  kHeadGroups,  // heads split into contiguous groups, one pattern per group
  kAllHeads,    // every head has every pattern, offset head mod r
};

// Parses "head_groups" / "all_heads".
absl::StatusOr<HeadLayout> ParseHeadLayout(const std::string& name);

struct DilatedOptions {
  std::vector<int64_t> segment_lengths;  // w_0..w_{G-1}
  std::vector<int64_t> dilation_rates;   // r_0..r_{G-1}
  HeadLayout head_layout = HeadLayout::kHeadGroups;
};

// The patterns of every head, [num_heads][patterns of that head]. Errors
// name the bad value: empty or unequal lists, w < 1, r < 1, heads < 1.
// Head groups: sizes num_heads / G, the first num_heads % G one larger
// (groups beyond num_heads are empty); group g has (w_g, r_g, g mod r_g).
// All heads: head j has (w_i, r_i, j mod r_i) for every i.
absl::StatusOr<std::vector<std::vector<DilatedPattern>>> DilatedHeadPatterns(
    const DilatedOptions& options, int64_t num_heads);

// The single pattern every head has in dense attention over n tokens.
DilatedPattern DensePattern(int64_t n);

// head_patterns with every pattern replaced by its Within(n) form.
std::vector<std::vector<DilatedPattern>> PatternsWithin(
    std::vector<std::vector<DilatedPattern>> head_patterns, int64_t n);

// On/off for each (query block, key block) pair of a sequence cut into
// blocks of block_size tokens (the last block may be short), held as the
// sorted key blocks that are on in each query block's row (compressed rows):
// memory and planning grow with the pairs that are on, not with
// num_blocks^2 (a 256-token local window over 4M tokens in blocks of 64
// takes under 3 MiB, where a byte per pair took 4 GiB).
class BlockMask {
 public:
  BlockMask() = default;
  // Row q (for q = 0, 1, ... in order) is what `row(q, &keys)` appends to
  // keys: strictly increasing key blocks below num_blocks (checked).
  BlockMask(int64_t block_size, int64_t num_blocks,
            absl::FunctionRef<void(int64_t, std::vector<int32_t>*)> row);
  // Asks on(q, k) of every pair, row by row: O(num_blocks^2), for small or
  // dense masks.
  static BlockMask FromPairs(int64_t block_size, int64_t num_blocks,
                             absl::FunctionRef<bool(int64_t, int64_t)> on);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  // The key blocks that are on in row query_block, increasing.
  absl::Span<const int32_t> Row(int64_t query_block) const {
    return absl::MakeConstSpan(keys_.data() + row_begin_[query_block],
                               keys_.data() + row_begin_[query_block + 1]);
  }
  bool on(int64_t query_block, int64_t key_block) const;
  // Whether query position t may attend key position u.
  bool Allows(int64_t t, int64_t u) const {
    return on(t / block_size_, u / block_size_);
  }
  // The number of pairs that are on, and their fraction of all pairs.
  int64_t OnPairs() const { return static_cast<int64_t>(keys_.size()); }
  double Density() const;
  // Row-major [num_blocks, num_blocks] of 0/1 (for output and tests).
  std::vector<uint8_t> ToDense() const;
  // The compressed rows: row q's keys are keys()[row_begin()[q] ..
  // row_begin()[q + 1]).
  const std::vector<int64_t>& row_begin() const { return row_begin_; }
  const std::vector<int32_t>& keys() const { return keys_; }

 private:
  int64_t block_size_ = 0;
  int64_t num_blocks_ = 0;
  std::vector<int64_t> row_begin_ = {0};  // [num_blocks + 1]
  std::vector<int32_t> keys_;
};

enum class SparsePattern {
  kLocalWindow,    // key blocks within `window` tokens of the query block
  kDilatedSparse,  // key blocks at multiples of `stride` blocks away
  kGlobalLocal,    // global blocks (first global_tokens) + local window
  kRandom,         // seeded, each pair on with probability `density`
  kExplicit,       // `explicit_mask` as given
};

// Parses local_window, dilated_sparse, global_local, random, explicit.
absl::StatusOr<SparsePattern> ParseSparsePattern(const std::string& name);

struct BlockSparseOptions {
  SparsePattern pattern = SparsePattern::kLocalWindow;
  int64_t block_size = 64;
  int64_t window = 256;        // tokens; rounded out to whole blocks
  int64_t stride = 2;          // dilated_sparse: blocks between key blocks
  int64_t global_tokens = 64;  // global_local; rounded out to whole blocks
  double density = 0.1;        // random: probability of each off-diagonal pair
  uint64_t seed = 0;           // random
  // kExplicit: row-major [blocks, blocks] 0/1 for the sequence length used.
  std::vector<uint8_t> explicit_mask;
};

// The block mask for a sequence of n tokens. Every generated pattern keeps
// the diagonal (a query block always sees its own block); an explicit mask
// is used as given. A block_size above n gives one block of n tokens
// (block_size() is then n); a sequence of more than 2^31 - 1 blocks is an
// error. Window, stride and global_tokens may take any value >= their
// minimum (beyond the sequence they change nothing). Rules in tokens are
// rounded out to whole blocks: local_window turns key block kb on when
// |qb - kb| <= ceil(window / block_size); dilated_sparse when
// |qb - kb| mod stride == 0; global_local when qb or kb holds one of the first
// global_tokens tokens, or the local window rule holds; random when
// Philox(seed, pair index) < density. Errors name the bad option.
absl::StatusOr<BlockMask> MakeBlockMask(const BlockSparseOptions& options,
                                        int64_t n);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_PATTERN_H_
