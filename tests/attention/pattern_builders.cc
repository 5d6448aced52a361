#include "tests/attention/pattern_builders.h"

#include <memory>
#include <utility>

#include "core/check.h"

namespace lc {
namespace testing {

AttentionPattern DenseHeads(int64_t heads, int64_t n) {
  AttentionPattern pattern;
  pattern.head_patterns.assign(heads, {DensePattern(n)});
  return pattern;
}

AttentionPattern DilatedHeads(const DilatedOptions& options, int64_t heads) {
  auto patterns = DilatedHeadPatterns(options, heads);
  LC_CHECK(patterns.ok()) << patterns.status();
  AttentionPattern pattern;
  pattern.head_patterns = *std::move(patterns);
  return pattern;
}

AttentionPattern BlockSparseHeads(const BlockSparseOptions& options,
                                  int64_t heads, int64_t n) {
  auto mask = MakeBlockMask(options, n);
  LC_CHECK(mask.ok()) << mask.status();
  AttentionPattern pattern = DenseHeads(heads, n);
  pattern.block_mask = std::make_shared<const BlockMask>(*std::move(mask));
  return pattern;
}

}  // namespace testing
}  // namespace lc
