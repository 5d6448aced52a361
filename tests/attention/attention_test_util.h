// Helpers for the attention suites: named attention problems, pattern
// builders, random inputs, and the comparison of lc::Attention with the torch
// oracle "masked_attention" (tests/torch_oracle_attention.cc) and with
// ReferenceAttention.
#ifndef LONGCTX_TESTS_ATTENTION_ATTENTION_TEST_UTIL_H_
#define LONGCTX_TESTS_ATTENTION_ATTENTION_TEST_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/pattern.h"
#include "core/random.h"
#include "core/tensor.h"
#include "tests/op_test_util.h"

namespace lc {
namespace testing {

// One attention problem: shapes, pattern and options.
struct AttentionCase {
  std::string name;
  int64_t batch = 2;
  int64_t n = 0;
  int64_t heads = 0;
  int64_t head_dim = 8;
  AttentionPattern pattern;
  AttentionOptions options;
};

// DensePattern(n) for every head.
AttentionPattern DenseHeads(int64_t heads, int64_t n);
// DilatedHeadPatterns(options, heads), which must succeed.
AttentionPattern DilatedHeads(const DilatedOptions& options, int64_t heads);
// Block-sparse: the dense pattern for every head plus MakeBlockMask(options,
// n), which must succeed.
AttentionPattern BlockSparseHeads(const BlockSparseOptions& options,
                                  int64_t heads, int64_t n);

struct Qkv {
  Tensor q, k, v;  // [batch, n, heads, head_dim]
};
// Fresh standard-normal q, k, v for `c` in `dtype`.
Qkv RandomQkv(const AttentionCase& c, DType dtype, Generator& gen);

// A test-local differentiable op: lse with -inf (a query with no allowed
// key) replaced by `value`, gradient passed through where lse is finite and
// zero elsewhere. ExpectAllClose counts -inf vs -inf as a mismatch (their
// difference is NaN), so lse goes through this before ExpectMatchesTorch;
// the -inf positions themselves are checked with ExpectLseClose.
Tensor ReplaceEmptyLse(const Tensor& lse, double value);

// lse comparison that allows -inf: actual is -inf exactly where expected is,
// and the finite entries are within `tol`.
void ExpectLseClose(const Tensor& actual, const Tensor& expected, Tolerance tol,
                    const std::string& what);

// The counts and keep weights the oracle needs for `c`: PairCounts, and
// DropoutKeepWeights drawn at generator state `gen` (a copy of the state
// Attention will use) when c.options.dropout > 0, else counts again.
struct OracleWeights {
  Tensor counts, keep;
};
OracleWeights WeightsFor(const AttentionCase& c, const Generator& gen);

// The generator state Attention will draw its dropout from under `options`.
Generator DropoutGeneratorState(const AttentionOptions& options);

// lc::Attention on `inputs` against the torch oracle (out, lse, and the
// gradients of q, k, v for random output gradients) within `tol`
// (DefaultTolerance of the inputs' dtype when null); then the -inf rows of
// lse against PairCounts, and out and lse against ReferenceAttention.
// Dropout draws use (a copy of) the generator of c.options.
void ExpectAttentionMatchesOracle(const AttentionCase& c, const Qkv& inputs,
                                  const Tolerance* tol = nullptr);

// Whether two tensors hold bit-identical values (same shape).
bool BitwiseEqual(const Tensor& a, const Tensor& b);

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_ATTENTION_ATTENTION_TEST_UTIL_H_
