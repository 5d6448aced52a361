#include "attention/reference_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/partial_attention.h"
#include "core/autograd.h"
#include "core/philox.h"
#include "core/random.h"
#include "core/status.h"

namespace lc {
namespace {

// Throws lc::Error unless `pattern` can be evaluated over n tokens and the
// padding mask (if any) is uint8 [batch, n].
void ValidatePairInputs(const AttentionPattern& pattern,
                        const Tensor& key_padding_mask, int64_t batch,
                        int64_t n) {
  LC_REQUIRE(batch >= 0 && n >= 0, "ReferenceAttention: batch ", batch,
             " and n ", n, " (expected >= 0)");
  for (size_t h = 0; h < pattern.head_patterns.size(); ++h) {
    for (const DilatedPattern& d : pattern.head_patterns[h]) {
      LC_REQUIRE(d.segment_length >= 1 && d.dilation_rate >= 1 &&
                     d.offset >= 0 && d.offset < d.dilation_rate,
                 "ReferenceAttention: head ", h,
                 " has pattern (w=", d.segment_length, ", r=", d.dilation_rate,
                 ", o=", d.offset, ") (expected w >= 1, r >= 1, 0 <= o < r)");
    }
  }
  if (pattern.block_mask != nullptr) {
    const BlockMask& m = *pattern.block_mask;
    LC_REQUIRE(m.block_size() >= 1 &&
                   m.num_blocks() == (n + m.block_size() - 1) / m.block_size(),
               "ReferenceAttention: block mask of ", m.num_blocks(),
               " blocks of ", m.block_size(), " tokens does not cover n = ", n);
  }
  if (key_padding_mask.defined()) {
    const Tensor& m = key_padding_mask;
    LC_REQUIRE(m.dtype() == DType::kUInt8 && m.shape() == Shape({batch, n}),
               "ReferenceAttention: key_padding_mask is ", DTypeName(m.dtype()),
               " ", ShapeToString(m.shape()), " (expected uint8 [", batch, ", ",
               n, "])");
  }
}

// Calls fn(b, h, pattern_index, t, u) for every pattern of every head that
// allows query t to attend key u in batch b.
template <typename Fn>
void ForEachAllowedPair(const AttentionPattern& pattern, bool causal,
                        const Tensor& key_padding_mask, int64_t batch,
                        int64_t n, const PairWindow& window, Fn&& fn) {
  ValidatePairInputs(pattern, key_padding_mask, batch, n);
  const std::vector<double> padding = key_padding_mask.defined()
                                          ? key_padding_mask.ToVector()
                                          : std::vector<double>();
  const BlockMask* block_mask = pattern.block_mask.get();
  const int64_t heads = static_cast<int64_t>(pattern.head_patterns.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const std::vector<DilatedPattern>& patterns = pattern.head_patterns[h];
      for (size_t i = 0; i < patterns.size(); ++i) {
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t u = 0; u < n; ++u) {
            if (!patterns[i].Allows(t, u)) continue;
            if (causal && u > t) continue;
            if (window.left >= 0 && u < t - window.left) continue;
            if (window.right >= 0 && u > t + window.right) continue;
            if (block_mask != nullptr && !block_mask->Allows(t, u)) continue;
            if (!padding.empty() && padding[b * n + u] != 0) continue;
            fn(b, h, static_cast<int64_t>(i), t, u);
          }
        }
      }
    }
  }
}

int64_t MaxPatterns(const AttentionPattern& pattern) {
  int64_t max_patterns = 1;
  for (const auto& patterns : pattern.head_patterns) {
    max_patterns =
        std::max<int64_t>(max_patterns, static_cast<int64_t>(patterns.size()));
  }
  return max_patterns;
}

}  // namespace

Tensor PairCounts(const AttentionPattern& pattern, bool causal,
                  const Tensor& key_padding_mask, int64_t batch, int64_t n,
                  const PairWindow& window) {
  return DropoutKeepWeights(pattern, causal, key_padding_mask, batch, n,
                            /*dropout=*/0, /*seed=*/0, /*offset=*/0, window);
}

Tensor DropoutKeepWeights(const AttentionPattern& pattern, bool causal,
                          const Tensor& key_padding_mask, int64_t batch,
                          int64_t n, double dropout, uint64_t seed,
                          uint64_t offset, const PairWindow& window) {
  LC_REQUIRE(dropout >= 0 && dropout < 1, "ReferenceAttention: dropout ",
             dropout, " (expected in [0, 1))");
  const int64_t heads = static_cast<int64_t>(pattern.head_patterns.size());
  const int64_t max_patterns = MaxPatterns(pattern);
  if (dropout > 0) {
    CheckAttentionDropoutDraws("ReferenceAttention", n,
                               batch * heads * max_patterns, offset);
  }
  const double keep_scale = 1.0 / (1.0 - dropout);
  Tensor weights = Zeros({batch, heads, n, n}, DType::kFloat64);
  double* w = weights.data<double>();
  ForEachAllowedPair(
      pattern, causal, key_padding_mask, batch, n, window,
      [&](int64_t b, int64_t h, int64_t i, int64_t t, int64_t u) {
        double factor = 1;
        if (dropout > 0) {
          const uint64_t stream = (b * heads + h) * max_patterns + i;
          const bool keep = static_cast<double>(AttentionDropoutUniform(
                                seed, offset, stream, n, t, u)) >= dropout;
          factor = keep ? keep_scale : 0;
        }
        w[((b * heads + h) * n + t) * n + u] += factor;
      });
  return weights;
}

AttentionResult ReferenceAttention(const Tensor& q, const Tensor& k,
                                   const Tensor& v,
                                   const AttentionPattern& pattern,
                                   const AttentionOptions& options,
                                   const AttentionCallOptions& call) {
  for (const Tensor* t : {&q, &k, &v}) {
    LC_REQUIRE(t->defined() && IsFloating(t->dtype()),
               "ReferenceAttention: q, k and v must be defined floating "
               "tensors");
  }
  LC_REQUIRE(q.dim() == 4, "ReferenceAttention: q has shape ",
             ShapeToString(q.shape()),
             " (expected [batch, n, heads, head_dim])");
  LC_REQUIRE(k.shape() == q.shape() && v.shape() == q.shape(),
             "ReferenceAttention: q ", ShapeToString(q.shape()), ", k ",
             ShapeToString(k.shape()), " and v ", ShapeToString(v.shape()),
             " must have the same shape");
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2),
                dim = q.size(3);
  LC_REQUIRE(static_cast<int64_t>(pattern.head_patterns.size()) == heads,
             "ReferenceAttention: the pattern has ",
             pattern.head_patterns.size(), " heads but q has ", heads);
  const double scale = options.scale.value_or(1.0 / std::sqrt(double(dim)));

  LC_REQUIRE(std::isfinite(options.softcap) && options.softcap >= 0,
             "ReferenceAttention: softcap ", options.softcap,
             " (expected > 0, or 0 for none)");
  const PairWindow window{options.window_left, options.window_right};
  const Tensor counts = PairCounts(pattern, options.causal,
                                   call.key_padding_mask, batch, n, window);
  Tensor keep = counts;
  if (options.dropout != 0) {
    LC_REQUIRE(options.dropout > 0 && options.dropout < 1,
               "ReferenceAttention: dropout ", options.dropout,
               " (expected in [0, 1))");
    LC_REQUIRE(call.generator != nullptr, "ReferenceAttention: dropout ",
               options.dropout, " without a generator");
    const uint64_t seed = call.generator->seed();
    const uint64_t offset = call.generator->NextOffset();
    keep = DropoutKeepWeights(pattern, options.causal, call.key_padding_mask,
                              batch, n, options.dropout, seed, offset, window);
  }

  NoGradGuard no_grad;
  const Tensor q64 = q.detach().to(DType::kFloat64).contiguous();
  const Tensor k64 = k.detach().to(DType::kFloat64).contiguous();
  const Tensor v64 = v.detach().to(DType::kFloat64).contiguous();
  const double *qd = q64.data<double>(), *kd = k64.data<double>(),
               *vd = v64.data<double>();
  const double *cd = counts.data<double>(), *kw = keep.data<double>();
  const double neg_inf = -std::numeric_limits<double>::infinity();
  Tensor out = Zeros(q.shape(), DType::kFloat64);
  Tensor lse = Full({batch, heads, n}, neg_inf, DType::kFloat64);
  double *od = out.data<double>(), *ld = lse.data<double>();
  // Element c of token t's row of head h in batch b of a [b, n, h, d] tensor.
  auto at = [&](int64_t b, int64_t t, int64_t h) {
    return ((b * n + t) * heads + h) * dim;
  };
  std::vector<double> s(n);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < n; ++t) {
        const double* c_row = cd + ((b * heads + h) * n + t) * n;
        const double* k_row = kw + ((b * heads + h) * n + t) * n;
        double max_score = neg_inf;
        for (int64_t u = 0; u < n; ++u) {
          if (c_row[u] == 0) continue;
          double dot = 0;
          for (int64_t c = 0; c < dim; ++c) {
            dot += qd[at(b, t, h) + c] * kd[at(b, u, h) + c];
          }
          s[u] = scale * dot;
          if (options.softcap > 0) {
            s[u] = options.softcap * std::tanh(s[u] / options.softcap);
          }
          max_score = std::max(max_score, s[u]);
        }
        if (max_score == neg_inf) continue;  // no allowed key: out 0, -inf
        double sum = 0;
        for (int64_t u = 0; u < n; ++u) {
          if (c_row[u] != 0) sum += c_row[u] * std::exp(s[u] - max_score);
        }
        const double l = max_score + std::log(sum);
        ld[(b * heads + h) * n + t] = l;
        for (int64_t u = 0; u < n; ++u) {
          if (c_row[u] == 0 || k_row[u] == 0) continue;
          const double p = k_row[u] * std::exp(s[u] - l);
          for (int64_t c = 0; c < dim; ++c) {
            od[at(b, t, h) + c] += p * vd[at(b, u, h) + c];
          }
        }
      }
    }
  }
  return {out, lse};
}

}  // namespace lc
