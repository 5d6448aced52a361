#include "attention/attention_kernel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "attention/attention_cuda.h"
#include "attention/attention_cuda_plan.h"
#include "attention/partial_attention.h"
#include "core/check.h"
#include "core/status.h"

namespace lc {
namespace {

using ScratchPtr =
    std::unique_ptr<AttentionScratch, void (*)(AttentionScratch*)>;

// A run of positions [range.begin, range.end) of one (batch, head) that no
// allowed pair crosses: both ends of every pair of the head's patterns lie in
// one segment of each pattern, and the range is a whole number of segments of
// every pattern (a multiple of the lcm of the segment lengths, or all of n).
// Units touch disjoint rows of out, lse and every gradient.
struct WorkUnit {
  int64_t b, h;
  PositionRange range;
  double cost;  // allowed pairs before causality and masks, for scheduling
};

PositionRange Intersect(PositionRange a, int64_t begin, int64_t end) {
  return {std::max(a.begin, begin), std::min(a.end, end)};
}

bool Touches(const std::vector<LocalSpan>& spans, PositionRange range) {
  for (const LocalSpan& s : spans) {
    const PositionRange r = Intersect(range, s.begin, s.end);
    if (r.begin < r.end) return true;
  }
  return false;
}

// The work units of every (batch, head) that hold both queries of ql and
// keys of kl, costliest first. Splitting heads into segment ranges keeps
// every thread busy when batch * heads is small or the heads' costs differ
// (head groups with different w / r^2).
std::vector<WorkUnit> WorkUnits(const AttentionProblem& p,
                                const TokenLayout& ql, const TokenLayout& kl) {
  std::vector<WorkUnit> units;
  for (int64_t h = 0; h < p.heads; ++h) {
    const std::vector<DilatedPattern>& patterns = p.pattern.head_patterns[h];
    if (patterns.empty()) continue;
    int64_t span = 1;  // lcm of the segment lengths, capped at n
    for (const DilatedPattern& d : patterns) {
      span = std::min(p.n, std::lcm(span, std::min(d.segment_length, p.n)));
    }
    for (int64_t begin = 0; begin < p.n; begin += span) {
      const PositionRange range{begin, std::min(begin + span, p.n)};
      if (!Touches(ql.SpansOf(h), range) || !Touches(kl.SpansOf(h), range)) {
        continue;
      }
      double cost = 0;
      for (const DilatedPattern& d : patterns) {
        // Selected queries times the selected keys of their segment.
        const double length = double(range.end - range.begin);
        cost += (length / d.dilation_rate) *
                (std::min<double>(length, d.segment_length) / d.dilation_rate);
      }
      for (int64_t b = 0; b < p.batch; ++b) {
        units.push_back(WorkUnit{b, h, range, cost});
      }
    }
  }
  std::stable_sort(
      units.begin(), units.end(),
      [](const WorkUnit& x, const WorkUnit& y) { return x.cost > y.cost; });
  return units;
}

// What a tile callback gets: the tile, its masks, and the spans of the
// local buffers that hold its queries and keys.
struct TileContext {
  int64_t b, h;
  const Tile& tile;
  const TileMask& mask;
  const LocalSpan& q_span;
  const LocalSpan& k_span;
  AttentionScratch* scratch;
};

// Calls fn(context) for every tile between ql's queries and kl's keys, one
// work unit per OpenMP iteration: units write disjoint rows of out, lse and
// every gradient, so no two threads touch the same memory, and each unit
// visits its tiles in the same order whichever thread runs it.
template <typename Fn>
void ForEachHeadTile(const AttentionProblem& p, const TokenLayout& ql,
                     const TokenLayout& kl, Fn&& fn) {
  const std::vector<WorkUnit> units = WorkUnits(p, ql, kl);
  const int64_t num_units = static_cast<int64_t>(units.size());
#pragma omp parallel
  {
    ScratchPtr scratch(NewAttentionScratch(), DeleteAttentionScratch);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_units; ++i) {
      const WorkUnit& unit = units[i];
      const int64_t bh = unit.b * p.heads + unit.h;
      const uint8_t* padding =
          p.key_padding.defined() ? p.key_padding.data<uint8_t>() + unit.b * p.n
                                  : nullptr;
      const std::vector<DilatedPattern>& patterns =
          p.pattern.head_patterns[unit.h];
      for (const LocalSpan& qs : ql.SpansOf(unit.h)) {
        const PositionRange q_range = Intersect(unit.range, qs.begin, qs.end);
        if (q_range.begin >= q_range.end) continue;
        for (const LocalSpan& ks : kl.SpansOf(unit.h)) {
          const PositionRange k_range = Intersect(unit.range, ks.begin, ks.end);
          if (k_range.begin >= k_range.end) continue;
          // A span of one pattern's keys is visited by that pattern alone.
          const int first = std::max(ks.pattern, 0);
          std::vector<DilatedPattern> one;
          if (ks.pattern >= 0) one.push_back(patterns[ks.pattern]);
          ForEachTile(ks.pattern >= 0 ? one : patterns, p.n, q_range, k_range,
                      p.plan, [&](const Tile& tile) {
                        TileMask mask;
                        mask.causal = p.plan.causal;
                        mask.block_mask = p.plan.block_mask;
                        if (padding != nullptr) {
                          mask.key_padding = padding + tile.k.position;
                          mask.key_padding_step = tile.k.step;
                        }
                        mask.dropout = p.dropout;
                        mask.dropout_seed = p.dropout_seed;
                        mask.dropout_offset = p.dropout_offset;
                        mask.dropout_stream =
                            bh * p.max_patterns + first + tile.pattern;
                        mask.sequence_length = p.n;
                        fn(TileContext{unit.b, unit.h, tile, mask, qs, ks,
                                       scratch.get()});
                      });
        }
      }
    }
  }
}

// Element offset of the row holding global position `position` (inside
// `span`) of head h of batch b, in a buffer of `layout`.
int64_t RowOffset(const AttentionProblem& p, const TokenLayout& layout,
                  const LocalSpan& span, int64_t b, int64_t h,
                  int64_t position) {
  return layout.Offset(p.heads, p.head_dim, b, h, span.RowOf(position));
}

// Elements between the rows of consecutive positions of `tile` (a run
// inside `span`) in a buffer of `layout`.
int64_t RowStep(const AttentionProblem& p, const TokenLayout& layout,
                const LocalSpan& span, const TileRows& tile) {
  return tile.step / span.step * layout.RowStride(p.heads, p.head_dim);
}

// Offset of the same row in a [batch, heads, rows] statistics buffer of a
// shared layout.
int64_t StatOffset(const AttentionProblem& p, int64_t rows,
                   const LocalSpan& span, int64_t b, int64_t h,
                   int64_t position) {
  return (b * p.heads + h) * rows + span.RowOf(position);
}

template <typename T>
RowSet<const T> TileRowSet(const T* data, const AttentionProblem& p,
                           const TokenLayout& layout, const LocalSpan& span,
                           int64_t b, int64_t h, const TileRows& tile) {
  return RowSet<const T>{data + RowOffset(p, layout, span, b, h, tile.position),
                         RowStep(p, layout, span, tile), tile.count,
                         tile.position, tile.step};
}

}  // namespace

TokenLayout TokenLayoutOf(const std::vector<PositionSpan>& spans) {
  TokenLayout layout;
  for (const PositionSpan& s : spans) {
    if (s.end <= s.begin) continue;
    layout.spans.push_back(LocalSpan{s.begin, s.end, layout.rows});
    layout.rows += s.end - s.begin;
  }
  return layout;
}

namespace {

// The keys of a layout in one canonical form: per head (one list for the
// unpacked form, whose spans every head shares) and pattern, the maximal
// runs {first, last, step} of positions, sorted. Two layouts hold the same
// keys exactly when these are equal, however their spans were cut.
std::vector<std::array<int64_t, 5>> CanonicalKeys(const TokenLayout& layout) {
  std::vector<std::array<int64_t, 5>> runs;  // head, pattern, first, last, step
  const int64_t heads =
      layout.packed() ? static_cast<int64_t>(layout.head_spans.size()) : 1;
  for (int64_t h = 0; h < heads; ++h) {
    for (const LocalSpan& span : layout.SpansOf(h)) {
      if (span.end <= span.begin) continue;
      const int64_t last =
          span.begin + (span.end - 1 - span.begin) / span.step * span.step;
      runs.push_back({h, span.pattern, span.begin, last, span.step});
    }
  }
  std::sort(runs.begin(), runs.end());
  std::vector<std::array<int64_t, 5>> merged;
  for (const auto& run : runs) {
    if (!merged.empty()) {
      auto& prev = merged.back();
      if (prev[0] == run[0] && prev[1] == run[1] && prev[4] == run[4] &&
          run[2] == prev[3] + run[4]) {
        prev[3] = run[3];
        continue;
      }
    }
    merged.push_back(run);
  }
  return merged;
}

bool SameSpans(const std::vector<LocalSpan>& a,
               const std::vector<LocalSpan>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                    [](const LocalSpan& x, const LocalSpan& y) {
                      return x.begin == y.begin && x.end == y.end &&
                             x.step == y.step && x.pattern == y.pattern;
                    });
}

}  // namespace

bool SameKeys(const TokenLayout& earlier, const TokenLayout& later) {
  const bool same =
      earlier.packed() == later.packed() && earlier.rows == later.rows;
  if (same && !(SameSpans(earlier.spans, later.spans) &&
                earlier.head_spans.size() == later.head_spans.size() &&
                std::equal(earlier.head_spans.begin(), earlier.head_spans.end(),
                           later.head_spans.begin(), SameSpans))) {
    LC_CHECK(CanonicalKeys(earlier) == CanonicalKeys(later))
        << "SameKeys: two layouts of one chunk's trip hold " << later.rows
        << " rows each but different keys; a later layout must keep a subset "
           "of the earlier one's keys";
  }
  return same;
}

std::shared_ptr<const AttentionProblem> MakeAttentionProblem(
    const Tensor& q, const Tensor& k, const Tensor& v, int64_t n,
    const AttentionPattern& pattern, const AttentionOptions& options) {
  for (const Tensor* t : {&q, &k, &v}) {
    LC_REQUIRE(t->defined(), "Attention: q, k and v must be defined");
  }
  LC_REQUIRE(q.dim() == 4, "Attention: q has shape ", ShapeToString(q.shape()),
             " (expected [batch, n, heads, head_dim])");
  LC_REQUIRE(k.shape() == q.shape() && v.shape() == q.shape(), "Attention: q ",
             ShapeToString(q.shape()), ", k ", ShapeToString(k.shape()),
             " and v ", ShapeToString(v.shape()), " must have the same shape");
  LC_REQUIRE(k.dtype() == q.dtype() && v.dtype() == q.dtype(),
             "Attention: q, k, v dtypes ", DTypeName(q.dtype()), ", ",
             DTypeName(k.dtype()), ", ", DTypeName(v.dtype()),
             " (expected one dtype)");
  LC_REQUIRE(k.device() == q.device() && v.device() == q.device(),
             "Attention: q on ", q.device().ToString(), ", k on ",
             k.device().ToString(), ", v on ", v.device().ToString(),
             " (expected one device)");
  const bool cuda = q.device().is_cuda();
  // On the CPU, bfloat16 was converted to float32 by the caller.
  LC_REQUIRE(q.dtype() == DType::kFloat32 || q.dtype() == DType::kFloat64 ||
                 (cuda && q.dtype() == DType::kBFloat16),
             "Attention: dtype ", DTypeName(q.dtype()),
             " (expected float32, float64 or bfloat16)");
  if (cuda) {
    LC_REQUIRE(q.size(3) >= 1 && q.size(3) <= kCudaMaxHeadDim,
               "Attention: head_dim ", q.size(3), " on ", q.device().ToString(),
               " (expected 1 to ", kCudaMaxHeadDim, ")");
    LC_REQUIRE(q.size(0) <= 65535, "Attention: batch ", q.size(0), " on ",
               q.device().ToString(), " (expected at most 65535)");
    LC_REQUIRE(n < (int64_t{1} << 31) && q.size(1) < (int64_t{1} << 31),
               "Attention: n = ", n, " on ", q.device().ToString(),
               " (expected fewer than 2^31 tokens)");
  }
  const int64_t heads = q.size(2);
  LC_REQUIRE(static_cast<int64_t>(pattern.head_patterns.size()) == heads,
             "Attention: the pattern has ", pattern.head_patterns.size(),
             " heads but q has ", heads);
  for (int64_t h = 0; h < heads; ++h) {
    for (const DilatedPattern& d : pattern.head_patterns[h]) {
      LC_REQUIRE(d.segment_length >= 1 && d.dilation_rate >= 1 &&
                     d.offset >= 0 && d.offset < d.dilation_rate,
                 "Attention: head ", h, " has pattern (w=", d.segment_length,
                 ", r=", d.dilation_rate, ", o=", d.offset,
                 ") (expected w >= 1, r >= 1, 0 <= o < r)");
    }
  }
  if (pattern.block_mask != nullptr) {
    const BlockMask& m = *pattern.block_mask;
    LC_REQUIRE(
        m.block_size() >= 1 && m.num_blocks() == CeilDiv(n, m.block_size()),
        "Attention: block mask of ", m.num_blocks(), " blocks of ",
        m.block_size(), " tokens does not cover n = ", n);
  }
  LC_REQUIRE(options.dropout >= 0 && options.dropout < 1, "Attention: dropout ",
             options.dropout, " (expected in [0, 1))");
  if (options.scale.has_value()) {
    LC_REQUIRE(std::isfinite(*options.scale), "Attention: scale ",
               *options.scale, " (expected a finite number)");
  }
  LC_REQUIRE(options.query_tile >= 1 && options.key_tile >= 1,
             "Attention: tile sizes ", options.query_tile, " x ",
             options.key_tile, " (expected >= 1)");
  if (options.key_padding_mask.defined()) {
    const Tensor& m = options.key_padding_mask;
    LC_REQUIRE(m.dtype() == DType::kUInt8 && m.shape() == Shape({q.size(0), n}),
               "Attention: key_padding_mask is ", DTypeName(m.dtype()), " ",
               ShapeToString(m.shape()), " (expected uint8 [", q.size(0), ", ",
               n, "])");
  }

  auto p = std::make_shared<AttentionProblem>();
  p->batch = q.size(0);
  p->n = n;
  p->heads = heads;
  p->head_dim = q.size(3);
  p->scale = options.scale.value_or(1.0 / std::sqrt(double(p->head_dim)));
  // A user's segment lengths and rates may be anything >= 1 (up to
  // INT64_MAX): every driver, one rank or the ring, runs the same pairs with
  // the equivalent values below 2n.
  p->pattern = pattern;
  p->pattern.head_patterns = PatternsWithin(pattern.head_patterns, n);
  for (const auto& patterns : pattern.head_patterns) {
    p->max_patterns = std::max<int64_t>(p->max_patterns,
                                        static_cast<int64_t>(patterns.size()));
  }
  p->plan.causal = options.causal;
  p->plan.block_mask = p->pattern.block_mask.get();
  p->plan.query_tile = options.query_tile;
  p->plan.key_tile = options.key_tile;
  p->plan.order = options.tile_order;
  p->dropout = options.dropout;
  if (options.dropout > 0) {
    Generator& gen =
        options.generator != nullptr ? *options.generator : DefaultGenerator();
    p->dropout_seed = gen.seed();
    p->dropout_offset = gen.NextOffset();
    CheckAttentionDropoutDraws("Attention", n,
                               p->batch * p->heads * p->max_patterns,
                               p->dropout_offset);
  }
  if (options.key_padding_mask.defined()) {
    p->key_padding = options.key_padding_mask.to(q.device()).contiguous();
  }
  if (cuda) p->cuda_plans = std::make_shared<CudaPlanCache>();
  return p;
}

template <typename T>
void AttentionForwardTiles(const AttentionProblem& p, const TokenLayout& ql,
                           const T* q, const TokenLayout& kl, const T* k,
                           const T* v, T* out, T* lse) {
  ForEachHeadTile(p, ql, kl, [&](const TileContext& c) {
    const TileRows& tq = c.tile.q;
    PartialAttentionForward<T>(
        TileRowSet(q, p, ql, c.q_span, c.b, c.h, tq),
        TileRowSet(k, p, kl, c.k_span, c.b, c.h, c.tile.k),
        TileRowSet(v, p, kl, c.k_span, c.b, c.h, c.tile.k), p.head_dim,
        static_cast<T>(p.scale), c.mask,
        out + RowOffset(p, ql, c.q_span, c.b, c.h, tq.position),
        RowStep(p, ql, c.q_span, tq),
        lse + StatOffset(p, ql.rows, c.q_span, c.b, c.h, tq.position), tq.step,
        c.scratch);
  });
}

template <typename T>
void AttentionBackwardTiles(const AttentionProblem& p, const TokenLayout& ql,
                            const T* q, const TokenLayout& kl, const T* k,
                            const T* v, const T* grad_out, const T* lse,
                            const T* delta, const T* grad_lse, T* dq, T* dk,
                            T* dv) {
  ForEachHeadTile(p, ql, kl, [&](const TileContext& c) {
    const TileRows& tq = c.tile.q;
    const TileRows& tk = c.tile.k;
    const int64_t stat =
        StatOffset(p, ql.rows, c.q_span, c.b, c.h, tq.position);
    const int64_t q_at = RowOffset(p, ql, c.q_span, c.b, c.h, tq.position);
    const int64_t q_step = RowStep(p, ql, c.q_span, tq);
    const int64_t k_at = RowOffset(p, kl, c.k_span, c.b, c.h, tk.position);
    PartialAttentionBackward<T>(
        TileRowSet(q, p, ql, c.q_span, c.b, c.h, tq),
        TileRowSet(k, p, kl, c.k_span, c.b, c.h, tk),
        TileRowSet(v, p, kl, c.k_span, c.b, c.h, tk), p.head_dim,
        static_cast<T>(p.scale), c.mask, grad_out + q_at, q_step, lse + stat,
        delta + stat, grad_lse + stat, tq.step, dq + q_at, q_step, dk + k_at,
        dv + k_at, RowStep(p, kl, c.k_span, tk), c.scratch);
  });
}

template <typename T>
void RowDelta(const AttentionProblem& p, int64_t rows, const T* out,
              const T* grad_out, T* delta) {
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < p.batch * rows; ++bt) {
    const int64_t b = bt / rows, t = bt % rows;
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t at = ((b * rows + t) * p.heads + h) * p.head_dim;
      T sum = 0;
      for (int64_t c = 0; c < p.head_dim; ++c) {
        sum += out[at + c] * grad_out[at + c];
      }
      delta[(b * p.heads + h) * rows + t] = sum;
    }
  }
}

#define LC_INSTANTIATE_ATTENTION_KERNEL(T)                                  \
  template void AttentionForwardTiles<T>(                                   \
      const AttentionProblem&, const TokenLayout&, const T*,                \
      const TokenLayout&, const T*, const T*, T*, T*);                      \
  template void AttentionBackwardTiles<T>(                                  \
      const AttentionProblem&, const TokenLayout&, const T*,                \
      const TokenLayout&, const T*, const T*, const T*, const T*, const T*, \
      const T*, T*, T*, T*);                                                \
  template void RowDelta<T>(const AttentionProblem&, int64_t, const T*,     \
                            const T*, T*);

LC_INSTANTIATE_ATTENTION_KERNEL(float)
LC_INSTANTIATE_ATTENTION_KERNEL(double)

namespace {

// The shape of a buffer of `layout`: [batch, rows, heads, head_dim], or
// [batch, rows, head_dim] packed; with per_row, the statistics shape
// [batch, heads, rows] of a shared layout.
Shape BufferShape(const AttentionProblem& p, const TokenLayout& layout,
                  bool per_row) {
  if (per_row) return {p.batch, p.heads, layout.rows};
  if (layout.packed()) return {p.batch, layout.rows, p.head_dim};
  return {p.batch, layout.rows, p.heads, p.head_dim};
}

// Checks that t is a contiguous buffer of `layout` (BufferShape) of `dtype`
// on `device`. Internal invariant of the drivers' callers.
void CheckBuffer(const AttentionProblem& p, const Tensor& t, DType dtype,
                 Device device, const TokenLayout& layout, bool per_row,
                 const char* what) {
  const Shape expected = BufferShape(p, layout, per_row);
  LC_CHECK(t.defined() && t.device() == device && t.dtype() == dtype &&
           t.shape() == expected && t.is_contiguous())
      << what << ": " << (t.defined() ? t.ToString() : "undefined")
      << " (expected contiguous " << DTypeName(dtype) << " "
      << ShapeToString(expected) << " on " << device.ToString() << ")";
}

// The dtype of the drivers' outputs (out, or dq, dk, dv) for inputs of
// `dtype`: the accumulator dtype, or bfloat16 written once (see
// CudaAttentionArgs::out_dtype) when `out` is bfloat16.
DType OutputDType(const AttentionProblem& p, DType dtype, const Tensor& out) {
  if (dtype == DType::kBFloat16 && out.defined() &&
      out.dtype() == DType::kBFloat16) {
    LC_CHECK_EQ(p.max_patterns, 1)
        << "bfloat16 outputs are written once: one pattern per head";
    return DType::kBFloat16;
  }
  return CudaAccumulatorDType(dtype);
}

CudaAttentionArgs ArgsOf(const AttentionProblem& p, const Tensor& q,
                         const TokenLayout& ql, const TokenLayout& kl,
                         DType out_dtype) {
  LC_CHECK(p.cuda_plans != nullptr) << "a CUDA driver on a CPU problem";
  CudaAttentionArgs args;
  args.dtype = q.dtype();
  args.out_dtype = out_dtype;
  args.device = q.device().index;
  args.batch = p.batch;
  args.n = p.n;
  args.heads = p.heads;
  args.head_dim = p.head_dim;
  LC_CHECK(!ql.packed()) << "queries come in a shared layout";
  args.q_rows = ql.rows;
  args.q_batch_stride = ql.rows * p.heads * p.head_dim;
  args.q_row_stride = p.heads * p.head_dim;
  args.k_batch_stride = kl.rows * kl.RowStride(p.heads, p.head_dim);
  args.k_row_stride = kl.RowStride(p.heads, p.head_dim);
  args.k_head_stride = kl.packed() ? 0 : p.head_dim;
  args.max_patterns = p.max_patterns;
  args.scale = p.scale;
  args.causal = p.plan.causal;
  args.key_padding =
      p.key_padding.defined() ? p.key_padding.data<uint8_t>() : nullptr;
  args.dropout = p.dropout;
  args.dropout_seed = p.dropout_seed;
  args.dropout_offset = p.dropout_offset;
  return args;
}

}  // namespace

DType CudaAccumulatorDType(DType dtype) {
  return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

void AttentionForwardTilesCuda(const AttentionProblem& p, const TokenLayout& ql,
                               const Tensor& q, const TokenLayout& kl,
                               const Tensor& k, const Tensor& v,
                               const Tensor& out_acc, const Tensor& lse) {
  const Device device = q.device();
  const DType acc = CudaAccumulatorDType(q.dtype());
  const DType out_dtype = OutputDType(p, q.dtype(), out_acc);
  CheckBuffer(p, q, q.dtype(), device, ql, false, "q");
  CheckBuffer(p, k, q.dtype(), device, kl, false, "k");
  CheckBuffer(p, v, q.dtype(), device, kl, false, "v");
  CheckBuffer(p, out_acc, out_dtype, device, ql, false, "out_acc");
  CheckBuffer(p, lse, acc, device, ql, true, "lse");
  if (ql.rows == 0 || kl.rows == 0) return;
  const CudaWorkList& queries =
      p.cuda_plans->Get(p, ql, kl, CudaWorkKind::kQueryItems, device);
  LaunchAttentionForward(ArgsOf(p, q, ql, kl, out_dtype), queries, q.raw_data(),
                         k.raw_data(), v.raw_data(), out_acc.raw_data(),
                         lse.raw_data());
}

void AttentionBackwardTilesCuda(const AttentionProblem& p,
                                const TokenLayout& ql, const Tensor& q,
                                const TokenLayout& kl, const Tensor& k,
                                const Tensor& v, const Tensor& grad_out,
                                const Tensor& lse, const Tensor& delta,
                                const Tensor& grad_lse, const Tensor& dq_acc,
                                const Tensor& dk_acc, const Tensor& dv_acc) {
  const Device device = q.device();
  const DType acc = CudaAccumulatorDType(q.dtype());
  CheckBuffer(p, q, q.dtype(), device, ql, false, "q");
  CheckBuffer(p, k, q.dtype(), device, kl, false, "k");
  CheckBuffer(p, v, q.dtype(), device, kl, false, "v");
  CheckBuffer(p, grad_out, q.dtype(), device, ql, false, "grad_out");
  CheckBuffer(p, lse, acc, device, ql, true, "lse");
  CheckBuffer(p, delta, acc, device, ql, true, "delta");
  CheckBuffer(p, grad_lse, acc, device, ql, true, "grad_lse");
  const DType out_dtype = OutputDType(p, q.dtype(), dq_acc);
  CheckBuffer(p, dq_acc, out_dtype, device, ql, false, "dq_acc");
  CheckBuffer(p, dk_acc, out_dtype, device, kl, false, "dk_acc");
  CheckBuffer(p, dv_acc, out_dtype, device, kl, false, "dv_acc");
  if (ql.rows == 0 || kl.rows == 0) return;
  const CudaWorkList& queries =
      p.cuda_plans->Get(p, ql, kl, CudaWorkKind::kQueryItems, device);
  const CudaWorkList& keys =
      p.cuda_plans->Get(p, ql, kl, CudaWorkKind::kKeyItems, device);
  LaunchAttentionBackward(ArgsOf(p, q, ql, kl, out_dtype), queries, keys,
                          q.raw_data(), k.raw_data(), v.raw_data(),
                          grad_out.raw_data(), lse.raw_data(), delta.raw_data(),
                          grad_lse.raw_data(), dq_acc.raw_data(),
                          dk_acc.raw_data(), dv_acc.raw_data());
}

void RowDeltaCuda(const AttentionProblem& p, int64_t rows, const Tensor& out,
                  const Tensor& grad_out, const Tensor& delta) {
  const Device device = out.device();
  TokenLayout layout;
  layout.rows = rows;
  CheckBuffer(p, out, out.dtype(), device, layout, false, "out");
  CheckBuffer(p, grad_out, out.dtype(), device, layout, false, "grad_out");
  CheckBuffer(p, delta, CudaAccumulatorDType(out.dtype()), device, layout, true,
              "delta");
  LaunchRowDelta(out.dtype(), device.index, p.batch, rows, p.heads, p.head_dim,
                 out.raw_data(), grad_out.raw_data(), delta.raw_data());
}

}  // namespace lc
