#include "tests/attention/attention_test_util.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

#include "attention/reference_attention.h"
#include "core/autograd.h"
#include "gtest/gtest.h"

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

Qkv RandomQkv(const AttentionCase& c, DType dtype, Generator& gen) {
  const Shape shape = {c.batch, c.n, c.heads, c.head_dim};
  return {Randn(shape, gen, dtype), Randn(shape, gen, dtype),
          Randn(shape, gen, dtype)};
}

Tensor ReplaceEmptyLse(const Tensor& lse, double value) {
  std::vector<double> values = lse.ToVector();
  std::vector<double> finite(values.size(), 1.0);
  for (size_t i = 0; i < values.size(); ++i) {
    if (std::isinf(values[i]) && values[i] < 0) {
      values[i] = value;
      finite[i] = 0;
    }
  }
  Tensor out = FromVector(values, lse.shape(), lse.dtype());
  if (NeedsGrad({lse})) {
    RecordOp("ReplaceEmptyLse", {lse}, {&out},
             [finite, shape = lse.shape(),
              dtype = lse.dtype()](const Tensors& g) -> Tensors {
               std::vector<double> grad = g[0].ToVector();
               for (size_t i = 0; i < grad.size(); ++i) grad[i] *= finite[i];
               return {FromVector(grad, shape, dtype)};
             });
  }
  return out;
}

void ExpectLseClose(const Tensor& actual, const Tensor& expected, Tolerance tol,
                    const std::string& what) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  const std::vector<double> a = actual.ToVector(), e = expected.ToVector();
  int mismatched_empty = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool a_empty = std::isinf(a[i]) && a[i] < 0;
    const bool e_empty = std::isinf(e[i]) && e[i] < 0;
    if (a_empty != e_empty) ++mismatched_empty;
  }
  EXPECT_EQ(mismatched_empty, 0)
      << what << ": lse is -inf (no allowed key) at different positions";
  ExpectAllClose(ReplaceEmptyLse(actual.detach(), 0),
                 ReplaceEmptyLse(expected.detach(), 0), tol, what);
}

Generator DropoutGeneratorState(const AttentionOptions& options) {
  return options.generator != nullptr ? *options.generator : DefaultGenerator();
}

OracleWeights WeightsFor(const AttentionCase& c, const Generator& gen) {
  OracleWeights w;
  w.counts = PairCounts(c.pattern, c.options.causal, c.options.key_padding_mask,
                        c.batch, c.n);
  w.keep = c.options.dropout > 0
               ? DropoutKeepWeights(c.pattern, c.options.causal,
                                    c.options.key_padding_mask, c.batch, c.n,
                                    c.options.dropout, gen.seed(), gen.offset())
               : w.counts;
  return w;
}

void ExpectAttentionMatchesOracle(const AttentionCase& c, const Qkv& inputs,
                                  const Tolerance* tol) {
  SCOPED_TRACE(c.name + (c.options.causal ? " causal" : " non-causal") +
               " tiles " + std::to_string(c.options.query_tile) + "x" +
               std::to_string(c.options.key_tile) + " " +
               DTypeName(inputs.q.dtype()));
  const Tolerance t =
      tol != nullptr ? *tol : DefaultTolerance(inputs.q.dtype());
  const Generator before = DropoutGeneratorState(c.options);
  const OracleWeights w = WeightsFor(c, before);
  AttentionResult raw;
  const OpFn fn = [&](const Tensors& in) -> Tensors {
    // in[3], in[4] (counts, keep) are oracle-only inputs: no gradient.
    raw = Attention(in[0], in[1], in[2], c.pattern, c.options);
    return {raw.out, ReplaceEmptyLse(raw.lse, 0)};
  };
  OracleAttrs attrs;
  attrs.numbers["scale"] = c.options.scale.value_or(
      1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  attrs.numbers["empty_lse"] = 0;
  ExpectMatchesTorch("masked_attention", fn,
                     {inputs.q, inputs.k, inputs.v, w.counts, w.keep}, attrs,
                     &t);

  // Which queries have no allowed key: exactly the all-zero rows of counts.
  const std::vector<double> counts = w.counts.ToVector();
  std::vector<double> empty_rows(c.batch * c.heads * c.n);
  for (size_t row = 0; row < empty_rows.size(); ++row) {
    double sum = 0;
    for (int64_t u = 0; u < c.n; ++u) sum += counts[row * c.n + u];
    empty_rows[row] = sum == 0 ? -std::numeric_limits<double>::infinity() : 0.0;
  }
  ExpectLseClose(
      raw.lse, FromVector(empty_rows, {c.batch, c.heads, c.n}, DType::kFloat64),
      Tolerance{0, std::numeric_limits<double>::infinity()},
      "-inf rows of lse vs all-zero rows of PairCounts");

  // ReferenceAttention, drawing its dropout from the same generator state.
  Generator reference_gen = before;
  AttentionOptions reference_options = c.options;
  reference_options.generator = &reference_gen;
  const AttentionResult reference = ReferenceAttention(
      inputs.q, inputs.k, inputs.v, c.pattern, reference_options);
  ExpectAllClose(raw.out, reference.out, t, "out vs ReferenceAttention");
  ExpectLseClose(raw.lse, reference.lse, t, "lse vs ReferenceAttention");
}

bool BitwiseEqual(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const std::vector<double> x = a.ToVector(), y = b.ToVector();
  return std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0;
}

}  // namespace testing
}  // namespace lc
