// Helpers for the attention suites: named attention problems, pattern
// builders, random inputs, a test-local transcription of SPEC section 2 (the
// oracle's pair counts and block masks, computed from the user's options
// without attention/'s pattern code), and the comparison of lc::Attention
// with the torch oracle "masked_attention" (tests/torch_oracle_attention.cc)
// and with ReferenceAttention.
#ifndef LONGCTX_TESTS_ATTENTION_ATTENTION_TEST_UTIL_H_
#define LONGCTX_TESTS_ATTENTION_ATTENTION_TEST_UTIL_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/pattern.h"
#include "core/random.h"
#include "core/tensor.h"
#include "tests/attention/pattern_builders.h"
#include "tests/op_test_util.h"

namespace lc {
namespace testing {

// What a case's pattern is made of, as a user gives it. The oracle derives
// its per-pair counts from these options with SpecPairCounts below (a
// transcription of SPEC section 2 in this test library), never from the
// AttentionPattern the code under test builds from them.
struct PatternSpec {
  std::optional<DilatedOptions> dilated;           // none: dense
  std::optional<BlockSparseOptions> block_sparse;  // none: no block mask
};

PatternSpec DenseSpec();
PatternSpec DilatedSpec(std::vector<int64_t> segment_lengths,
                        std::vector<int64_t> dilation_rates, HeadLayout layout);
// The block mask of `options` alone (over the dense pattern), or
// intersected with the dilated patterns of `dilated`.
PatternSpec BlockSparseSpec(const BlockSparseOptions& options,
                            std::optional<DilatedOptions> dilated = {});

// One attention problem: shapes, pattern and options.
struct AttentionCase {
  std::string name;
  int64_t batch = 2;
  int64_t n = 0;
  int64_t heads = 0;
  int64_t head_dim = 8;
  PatternSpec spec;
  AttentionPattern pattern;  // built from spec by the code under test
  AttentionOptions options;
  AttentionCallOptions call;
};

// A case whose pattern is built from `spec` by the code under test
// (DilatedHeadPatterns, DensePattern, MakeBlockMask).
AttentionCase MakeAttentionCase(std::string name, int64_t n, int64_t heads,
                                PatternSpec spec);

// The test's own reading of SPEC section 2, independent of attention/:
// a dilated pattern (w, r, o) of one head.
struct SpecPattern {
  int64_t w, r, o;
};
// The patterns of each of `heads` heads: head groups (sizes heads / G, the
// first heads mod G one larger; group g has (w_g, r_g, g mod r_g)) or all
// heads (head j has (w_i, r_i, j mod r_i) for every i); dense: one pattern
// (n, 1, 0).
std::vector<std::vector<SpecPattern>> SpecHeadPatterns(const PatternSpec& spec,
                                                       int64_t heads,
                                                       int64_t n);
// Row-major [blocks, blocks] 0/1 block mask of `options` over n tokens
// (blocks = ceil(n / block_size), the last may be short), from the rules in
// token terms rounded out to whole blocks: local_window turns a key block on
// when some of its tokens lie within `window` tokens of some token of the
// query block; global_local adds the rows and columns of the blocks holding
// any of the first global_tokens tokens; dilated_sparse when the block
// distance is a multiple of stride; random when UniformAt(seed, 0, pair
// index) < density, or on the diagonal; explicit as given.
std::vector<uint8_t> SpecBlockMask(const BlockSparseOptions& options,
                                   int64_t n);

// The counts and keep weights the oracle needs for `c`, [batch, heads, n, n]
// float64: counts[b, h, t, u] is the number of patterns of head h allowing
// (t, u) by SPEC section 2 (both selected, same segment, block pair on, u <=
// t when causal, key u not padding); keep is the sum over those patterns of
// the attention-dropout keep factor of the pair, drawn as TileMask documents
// (attention/partial_attention.h) at generator state `gen` (a copy of the
// state Attention will use) when c.options.dropout > 0, else counts again.
struct OracleWeights {
  Tensor counts, keep;
};
OracleWeights WeightsFor(const AttentionCase& c, const Generator& gen);

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

// The generator state Attention will draw its dropout from under `call`
// (a copy of call.generator's; a fresh one when it has none).
Generator DropoutGeneratorState(const AttentionCallOptions& call);

// lc::Attention on `inputs` against the torch oracle (out, lse, and the
// gradients of q, k, v for random output gradients) within `tol`
// (DefaultTolerance of the inputs' dtype when null), the oracle's weights
// coming from WeightsFor (c.spec, not c.pattern); then the -inf rows of lse
// against the all-zero rows of those counts, and out and lse against
// ReferenceAttention.
// Dropout draws use (a copy of) the generator of c.call.
void ExpectAttentionMatchesOracle(const AttentionCase& c, const Qkv& inputs,
                                  const Tolerance* tol = nullptr);

// Whether two tensors hold bit-identical values (same shape).
bool BitwiseEqual(const Tensor& a, const Tensor& b);

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_ATTENTION_ATTENTION_TEST_UTIL_H_
