// Attention patterns for tests, built by the code under test (DensePattern,
// DilatedHeadPatterns, MakeBlockMask), shared by the CPU suites and the GPU
// suite (which links no libtorch).
#ifndef LONGCTX_TESTS_ATTENTION_PATTERN_BUILDERS_H_
#define LONGCTX_TESTS_ATTENTION_PATTERN_BUILDERS_H_

#include <cstdint>

#include "attention/attention.h"
#include "attention/pattern.h"

namespace lc {
namespace testing {

// DensePattern(n) for every head.
AttentionPattern DenseHeads(int64_t heads, int64_t n);
// DilatedHeadPatterns(options, heads), which must succeed.
AttentionPattern DilatedHeads(const DilatedOptions& options, int64_t heads);
// Block-sparse: the dense pattern for every head plus MakeBlockMask(options,
// n), which must succeed.
AttentionPattern BlockSparseHeads(const BlockSparseOptions& options,
                                  int64_t heads, int64_t n);

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_ATTENTION_PATTERN_BUILDERS_H_
