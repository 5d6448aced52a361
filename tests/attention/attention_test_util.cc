#include "tests/attention/attention_test_util.h"

#include <algorithm>
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

PatternSpec DenseSpec() { return {}; }

PatternSpec DilatedSpec(std::vector<int64_t> segment_lengths,
                        std::vector<int64_t> dilation_rates,
                        HeadLayout layout) {
  DilatedOptions o;
  o.segment_lengths = std::move(segment_lengths);
  o.dilation_rates = std::move(dilation_rates);
  o.head_layout = layout;
  PatternSpec spec;
  spec.dilated = std::move(o);
  return spec;
}

PatternSpec BlockSparseSpec(const BlockSparseOptions& options,
                            std::optional<DilatedOptions> dilated) {
  PatternSpec spec;
  spec.dilated = std::move(dilated);
  spec.block_sparse = options;
  return spec;
}

AttentionCase MakeAttentionCase(std::string name, int64_t n, int64_t heads,
                                PatternSpec spec) {
  AttentionCase c;
  c.name = std::move(name);
  c.n = n;
  c.heads = heads;
  c.pattern = spec.dilated.has_value() ? DilatedHeads(*spec.dilated, heads)
                                       : DenseHeads(heads, n);
  if (spec.block_sparse.has_value()) {
    c.pattern.block_mask =
        BlockSparseHeads(*spec.block_sparse, heads, n).block_mask;
  }
  c.spec = std::move(spec);
  return c;
}

std::vector<std::vector<SpecPattern>> SpecHeadPatterns(const PatternSpec& spec,
                                                       int64_t heads,
                                                       int64_t n) {
  std::vector<std::vector<SpecPattern>> patterns(heads);
  if (!spec.dilated.has_value()) {
    for (auto& head : patterns) head.push_back({n, 1, 0});
    return patterns;
  }
  const std::vector<int64_t>& w = spec.dilated->segment_lengths;
  const std::vector<int64_t>& r = spec.dilated->dilation_rates;
  const int64_t groups = static_cast<int64_t>(w.size());
  if (spec.dilated->head_layout == HeadLayout::kAllHeads) {
    for (int64_t j = 0; j < heads; ++j) {
      for (int64_t i = 0; i < groups; ++i) {
        patterns[j].push_back({w[i], r[i], j % r[i]});
      }
    }
    return patterns;
  }
  // Head groups: walk the heads, moving to the next group when this one is
  // full (sizes heads / G, the first heads mod G one larger).
  int64_t group = 0, used = 0;
  for (int64_t j = 0; j < heads; ++j) {
    const int64_t size = heads / groups + (group < heads % groups ? 1 : 0);
    if (used == size) {
      ++group;
      used = 0;
    }
    patterns[j].push_back({w[group], r[group], group % r[group]});
    ++used;
  }
  return patterns;
}

std::vector<uint8_t> SpecBlockMask(const BlockSparseOptions& options,
                                   int64_t n) {
  const int64_t bs = options.block_size;
  const int64_t blocks = (n + bs - 1) / bs;
  // Token range [first, last] of block b.
  auto first = [&](int64_t b) { return b * bs; };
  auto last = [&](int64_t b) { return std::min(n, (b + 1) * bs) - 1; };
  // The smallest |t - u| over t in block a and u in block b.
  auto gap = [&](int64_t a, int64_t b) -> int64_t {
    if (a == b) return 0;
    return a < b ? first(b) - last(a) : first(a) - last(b);
  };
  auto global = [&](int64_t b) { return first(b) < options.global_tokens; };
  std::vector<uint8_t> mask(blocks * blocks, 0);
  for (int64_t q = 0; q < blocks; ++q) {
    for (int64_t k = 0; k < blocks; ++k) {
      bool on = false;
      switch (options.pattern) {
        case SparsePattern::kLocalWindow:
          on = gap(q, k) <= options.window;
          break;
        case SparsePattern::kGlobalLocal:
          on = gap(q, k) <= options.window || global(q) || global(k);
          break;
        case SparsePattern::kDilatedSparse:
          on = (q > k ? q - k : k - q) % options.stride == 0;
          break;
        case SparsePattern::kRandom:
          on = q == k ||
               UniformAt(options.seed, 0, q * blocks + k) < options.density;
          break;
        case SparsePattern::kExplicit:
          on = options.explicit_mask[q * blocks + k] != 0;
          break;
      }
      mask[q * blocks + k] = on ? 1 : 0;
    }
  }
  return mask;
}

OracleWeights WeightsFor(const AttentionCase& c, const Generator& gen) {
  const int64_t n = c.n, heads = c.heads;
  const std::vector<std::vector<SpecPattern>> patterns =
      SpecHeadPatterns(c.spec, heads, n);
  std::vector<uint8_t> block_mask;
  int64_t block_size = 1, blocks = n;
  if (c.spec.block_sparse.has_value()) {
    block_mask = SpecBlockMask(*c.spec.block_sparse, n);
    block_size = c.spec.block_sparse->block_size;
    blocks = (n + block_size - 1) / block_size;
  }
  const std::vector<double> padding = c.call.key_padding_mask.defined()
                                          ? c.call.key_padding_mask.ToVector()
                                          : std::vector<double>();
  size_t max_patterns = 1;
  for (const auto& head : patterns) {
    max_patterns = std::max(max_patterns, head.size());
  }
  const double p = c.options.dropout;
  std::vector<double> counts(c.batch * heads * n * n, 0.0);
  std::vector<double> keep(counts.size(), 0.0);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      for (size_t i = 0; i < patterns[h].size(); ++i) {
        const SpecPattern& d = patterns[h][i];
        auto selected = [&](int64_t pos) { return (pos % d.w) % d.r == d.o; };
        const uint64_t stream = (b * heads + h) * max_patterns + i;
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t u = 0; u < n; ++u) {
            if (!selected(t) || !selected(u) || t / d.w != u / d.w) continue;
            if (!block_mask.empty() &&
                block_mask[(t / block_size) * blocks + u / block_size] == 0) {
              continue;
            }
            if (c.options.causal && u > t) continue;
            if (c.options.window_left >= 0 && u < t - c.options.window_left) {
              continue;
            }
            if (c.options.window_right >= 0 && u > t + c.options.window_right) {
              continue;
            }
            if (!padding.empty() && padding[b * n + u] != 0) continue;
            const size_t at = ((b * heads + h) * n + t) * n + u;
            counts[at] += 1;
            if (p > 0) {
              // Philox counter: stream, offset and t * n + u, from the top.
              const bool kept =
                  UniformAt(gen.seed(), stream << 32 | gen.offset(),
                            t * n + u) >= p;
              keep[at] += kept ? 1 / (1 - p) : 0;
            }
          }
        }
      }
    }
  }
  const Shape shape = {c.batch, heads, n, n};
  OracleWeights w;
  w.counts = FromVector(counts, shape, DType::kFloat64);
  w.keep = p > 0 ? FromVector(keep, shape, DType::kFloat64) : w.counts;
  return w;
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

Generator DropoutGeneratorState(const AttentionCallOptions& call) {
  return call.generator != nullptr ? *call.generator : Generator();
}

void ExpectAttentionMatchesOracle(const AttentionCase& c, const Qkv& inputs,
                                  const Tolerance* tol) {
  SCOPED_TRACE(c.name + (c.options.causal ? " causal" : " non-causal") +
               " tiles " + std::to_string(c.options.query_tile) + "x" +
               std::to_string(c.options.key_tile) + " " +
               DTypeName(inputs.q.dtype()));
  const Tolerance t =
      tol != nullptr ? *tol : DefaultTolerance(inputs.q.dtype());
  // Dropout draws from c.call's generator, or from one of the test's own.
  Generator own = DropoutGeneratorState(c.call);
  AttentionCallOptions call = c.call;
  if (call.generator == nullptr) call.generator = &own;
  const Generator before = *call.generator;
  const OracleWeights w = WeightsFor(c, before);
  AttentionResult raw;
  const OpFn fn = [&](const Tensors& in) -> Tensors {
    // in[3], in[4] (counts, keep) are oracle-only inputs: no gradient.
    raw = Attention(in[0], in[1], in[2], c.pattern, c.options, call);
    return {raw.out, ReplaceEmptyLse(raw.lse, 0)};
  };
  OracleAttrs attrs;
  attrs.numbers["scale"] = c.options.scale.value_or(
      1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  attrs.numbers["empty_lse"] = 0;
  if (c.options.softcap > 0) attrs.numbers["softcap"] = c.options.softcap;
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
      "-inf rows of lse vs all-zero rows of the counts");

  // ReferenceAttention, drawing its dropout from the same generator state.
  Generator reference_gen = before;
  AttentionCallOptions reference_call = call;
  reference_call.generator = &reference_gen;
  const AttentionResult reference = ReferenceAttention(
      inputs.q, inputs.k, inputs.v, c.pattern, c.options, reference_call);
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
