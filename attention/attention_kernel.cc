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
  PositionSpan range;
  double cost;  // allowed pairs before causality and masks, for scheduling
};

PositionSpan Intersect(PositionSpan a, int64_t begin, int64_t end) {
  return {std::max(a.begin, begin), std::min(a.end, end)};
}

bool Touches(const std::vector<LocalSpan>& spans, PositionSpan range) {
  for (const LocalSpan& s : spans) {
    const PositionSpan r = Intersect(range, s.begin, s.end);
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
      const PositionSpan range{begin, std::min(begin + span, p.n)};
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
void ForEachHeadTile(const AttentionProblem& p, const AttentionCall& call,
                     const TokenLayout& ql, const TokenLayout& kl, Fn&& fn) {
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
          call.key_padding.defined()
              ? call.key_padding.data<uint8_t>() + unit.b * p.n
              : nullptr;
      const std::vector<DilatedPattern>& patterns =
          p.pattern.head_patterns[unit.h];
      for (const LocalSpan& qs : ql.SpansOf(unit.h)) {
        const PositionSpan q_range = Intersect(unit.range, qs.begin, qs.end);
        if (q_range.begin >= q_range.end) continue;
        for (const LocalSpan& ks : kl.SpansOf(unit.h)) {
          const PositionSpan k_range = Intersect(unit.range, ks.begin, ks.end);
          if (k_range.begin >= k_range.end) continue;
          // A span of one pattern's keys is visited by that pattern alone.
          const int first = std::max(ks.pattern, 0);
          std::vector<DilatedPattern> one;
          if (ks.pattern >= 0) one.push_back(patterns[ks.pattern]);
          ForEachTile(ks.pattern >= 0 ? one : patterns, p.n, q_range, k_range,
                      p.plan, [&](const Tile& tile) {
                        TileMask mask;
                        mask.causal = p.plan.causal;
                        mask.window_left = p.plan.window_left;
                        mask.window_right = p.plan.window_right;
                        mask.softcap = p.softcap;
                        mask.block_mask = p.plan.block_mask;
                        if (padding != nullptr) {
                          mask.key_padding = padding + tile.k.position;
                          mask.key_padding_step = tile.k.step;
                        }
                        mask.dropout = p.dropout;
                        mask.dropout_seed = call.dropout_seed;
                        mask.dropout_offset = call.dropout_offset;
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

std::shared_ptr<AttentionProblem> MakeAttentionProblem(
    const TensorSpec& inputs, int64_t n, const AttentionPattern& pattern,
    const AttentionOptions& options) {
  const Shape& shape = inputs.shape;
  LC_REQUIRE(shape.size() == 4, "Attention: q has shape ", ShapeToString(shape),
             " (expected [batch, n, heads, head_dim])");
  const bool cuda = inputs.device.is_cuda();
  LC_REQUIRE(inputs.dtype == DType::kFloat32 ||
                 inputs.dtype == DType::kFloat64 ||
                 inputs.dtype == DType::kBFloat16,
             "Attention: dtype ", DTypeName(inputs.dtype),
             " (expected float32, float64 or bfloat16)");
  if (cuda) {
    LC_REQUIRE(shape[3] >= 1 && shape[3] <= kCudaMaxHeadDim,
               "Attention: head_dim ", shape[3], " on ",
               inputs.device.ToString(), " (expected 1 to ", kCudaMaxHeadDim,
               ")");
    LC_REQUIRE(shape[0] <= 65535, "Attention: batch ", shape[0], " on ",
               inputs.device.ToString(), " (expected at most 65535)");
    LC_REQUIRE(n < (int64_t{1} << 31) && shape[1] < (int64_t{1} << 31),
               "Attention: n = ", n, " on ", inputs.device.ToString(),
               " (expected fewer than 2^31 tokens)");
  }
  const int64_t heads = shape[2];
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
  LC_REQUIRE(options.window_left >= -1 && options.window_right >= -1,
             "Attention: window (", options.window_left, ", ",
             options.window_right,
             ") (expected each >= 0, or -1 for unlimited)");
  LC_REQUIRE(std::isfinite(options.softcap) && options.softcap >= 0,
             "Attention: softcap ", options.softcap,
             " (expected > 0, or 0 for none)");
  // The CUDA kernels do not apply windows or soft-capping yet: refused
  // rather than silently ignored.
  LC_REQUIRE(!cuda || (options.window_left == -1 &&
                       options.window_right == -1 && options.softcap == 0),
             "Attention: window (", options.window_left, ", ",
             options.window_right, ") and softcap ", options.softcap, " on ",
             inputs.device.ToString(),
             " (windows and soft-capping run on the CPU only so far)");
  if (options.scale.has_value()) {
    LC_REQUIRE(std::isfinite(*options.scale), "Attention: scale ",
               *options.scale, " (expected a finite number)");
  }
  LC_REQUIRE(options.query_tile >= 1 && options.key_tile >= 1,
             "Attention: tile sizes ", options.query_tile, " x ",
             options.key_tile, " (expected >= 1)");

  auto p = std::make_shared<AttentionProblem>();
  p->batch = shape[0];
  p->rows = shape[1];
  p->n = n;
  p->heads = heads;
  p->head_dim = shape[3];
  p->dtype = inputs.dtype;
  p->device = inputs.device;
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
  p->plan.window_left = options.window_left;
  p->plan.window_right = options.window_right;
  p->plan.block_mask = p->pattern.block_mask.get();
  p->plan.query_tile = options.query_tile;
  p->plan.key_tile = options.key_tile;
  p->plan.order = options.tile_order;
  p->dropout = options.dropout;
  p->softcap = options.softcap;
  if (cuda) p->cuda_work_lists = std::make_shared<CudaWorkLists>();
  return p;
}

void CheckAttentionInputs(const char* op, const TensorSpec& expected,
                          const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const Tensor* t : {&q, &k, &v}) {
    LC_REQUIRE(t->defined(), op, ": q, k and v must be defined");
  }
  LC_REQUIRE(q.shape() == expected.shape && k.shape() == expected.shape &&
                 v.shape() == expected.shape,
             op, ": q ", ShapeToString(q.shape()), ", k ",
             ShapeToString(k.shape()), " and v ", ShapeToString(v.shape()),
             " must have the same shape (expected ",
             ShapeToString(expected.shape), ")");
  LC_REQUIRE(q.dtype() == expected.dtype && k.dtype() == expected.dtype &&
                 v.dtype() == expected.dtype,
             op, ": q, k, v dtypes ", DTypeName(q.dtype()), ", ",
             DTypeName(k.dtype()), ", ", DTypeName(v.dtype()),
             " (expected one dtype, ", DTypeName(expected.dtype), ")");
  LC_REQUIRE(q.device() == expected.device && k.device() == expected.device &&
                 v.device() == expected.device,
             op, ": q on ", q.device().ToString(), ", k on ",
             k.device().ToString(), ", v on ", v.device().ToString(),
             " (expected one device, ", expected.device.ToString(), ")");
}

AttentionCall MakeAttentionCall(const char* op, const AttentionProblem& p,
                                const AttentionCallOptions& options) {
  AttentionCall call;
  if (p.dropout > 0) {
    LC_REQUIRE(options.generator != nullptr, op, ": dropout ", p.dropout,
               " without a generator (AttentionCallOptions::generator must "
               "name the stream its draws come from)");
    call.dropout_seed = options.generator->seed();
    call.dropout_offset = options.generator->NextOffset();
    CheckAttentionDropoutDraws(op, p.n, p.batch * p.heads * p.max_patterns,
                               call.dropout_offset);
  }
  if (options.key_padding_mask.defined()) {
    CheckKeyPaddingMask(op, options.key_padding_mask, p.batch, p.n);
    call.key_padding = options.key_padding_mask.to(p.device).contiguous();
  }
  return call;
}

void CheckKeyPaddingMask(const char* op, const Tensor& mask, int64_t batch,
                         int64_t n) {
  if (!mask.defined()) return;
  LC_REQUIRE(mask.dtype() == DType::kUInt8 && mask.shape() == Shape({batch, n}),
             op, ": key_padding_mask is ", DTypeName(mask.dtype()), " ",
             ShapeToString(mask.shape()), " (expected uint8 [", batch, ", ", n,
             "])");
}

template <typename T>
void AttentionForwardTiles(const AttentionProblem& p, const AttentionCall& call,
                           const TokenLayout& ql, const T* q,
                           const TokenLayout& kl, const T* k, const T* v,
                           T* out, T* lse) {
  ForEachHeadTile(p, call, ql, kl, [&](const TileContext& c) {
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
void AttentionBackwardTiles(const AttentionProblem& p,
                            const AttentionCall& call, const TokenLayout& ql,
                            const T* q, const TokenLayout& kl, const T* k,
                            const T* v, const T* grad_out, const T* lse,
                            const T* delta, const T* grad_lse, T* dq, T* dk,
                            T* dv) {
  ForEachHeadTile(p, call, ql, kl, [&](const TileContext& c) {
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
      const AttentionProblem&, const AttentionCall&, const TokenLayout&,    \
      const T*, const TokenLayout&, const T*, const T*, T*, T*);            \
  template void AttentionBackwardTiles<T>(                                  \
      const AttentionProblem&, const AttentionCall&, const TokenLayout&,    \
      const T*, const TokenLayout&, const T*, const T*, const T*, const T*, \
      const T*, const T*, T*, T*, T*);                                      \
  template void RowDelta<T>(const AttentionProblem&, int64_t, const T*,     \
                            const T*, T*);

LC_INSTANTIATE_ATTENTION_KERNEL(float)
LC_INSTANTIATE_ATTENTION_KERNEL(double)

}  // namespace lc
