#include "attention/ring_plan.h"

#include <algorithm>
#include <utility>

#include "attention/tile_plan.h"
#include "core/check.h"

namespace lc {
namespace {

// Position ranges [begin, end), sorted and disjoint.
using Ranges = std::vector<PositionSpan>;

// The keys of one chunk that one rank's queries attend, per head and per
// pattern of the head: every key of that pattern in the ranges is attended
// by some query (keys of a pattern that lie in a range but that the pattern
// does not select are not counted).
using UsedKeys = std::vector<std::vector<Ranges>>;  // [head][pattern]

bool SamePatterns(const std::vector<DilatedPattern>& a,
                  const std::vector<DilatedPattern>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                    [](const DilatedPattern& x, const DilatedPattern& y) {
                      return x.segment_length == y.segment_length &&
                             x.dilation_rate == y.dilation_rate &&
                             x.offset == y.offset;
                    });
}

// Sorts ranges and merges those that overlap or touch.
Ranges Merged(Ranges ranges) {
  std::sort(ranges.begin(), ranges.end(),
            [](const PositionSpan& a, const PositionSpan& b) {
              return a.begin < b.begin;
            });
  Ranges merged;
  for (const PositionSpan& r : ranges) {
    if (!merged.empty() && r.begin <= merged.back().end) {
      merged.back().end = std::max(merged.back().end, r.end);
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

// The keys of `keys` that queries at the positions of `queries` attend
// under the problem's patterns, block mask and causality (key padding
// aside: padded keys still travel). One tile per segment and block pair:
// its keys up to the last query (causal) are all attended by some query of
// the tile. The result depends only on the set of query positions (a tile's
// keys start at its first key and end at its last query's last key), so
// the queries of many ranks are asked about in one pass.
UsedKeys FindUsedKeys(const AttentionProblem& p,
                      const std::vector<PositionSpan>& queries,
                      const TokenLayout& keys) {
  TilePlanOptions coarse = p.plan;
  coarse.query_tile = coarse.key_tile = std::max<int64_t>(p.n, 1);
  coarse.order = TileOrder::kRowMajor;
  UsedKeys used(p.heads);
  for (int64_t h = 0; h < p.heads; ++h) {
    const std::vector<DilatedPattern>& patterns = p.pattern.head_patterns[h];
    // Heads with the same patterns use the same keys.
    bool copied = false;
    for (int64_t g = 0; g < h && !copied; ++g) {
      if (SamePatterns(p.pattern.head_patterns[g], patterns)) {
        used[h] = used[g];
        copied = true;
      }
    }
    if (copied) continue;
    used[h].resize(patterns.size());
    for (const PositionSpan& qs : queries) {
      for (const LocalSpan& ks : keys.spans) {
        ForEachTile(
            patterns, p.n, {qs.begin, qs.end}, {ks.begin, ks.end}, coarse,
            [&](const Tile& t) {
              int64_t last = t.k.last();
              if (p.plan.causal && last > t.q.last()) {
                last = t.k.position +
                       (t.q.last() - t.k.position) / t.k.step * t.k.step;
              }
              const int64_t w = patterns[t.pattern].segment_length;
              const int64_t segment_end =
                  std::min(p.n, (t.k.position / w + 1) * w);
              used[h][t.pattern].push_back(
                  {t.k.position, std::min(last + t.k.step, segment_end)});
            });
      }
    }
    for (Ranges& ranges : used[h]) ranges = Merged(std::move(ranges));
  }
  return used;
}

bool AnyKey(const UsedKeys& used) {
  for (const auto& head : used) {
    for (const Ranges& ranges : head) {
      if (!ranges.empty()) return true;
    }
  }
  return false;
}

// The token positions of the ranks origin + first .. origin + last (mod
// size), 1 <= first <= last < size: one or two runs of consecutive ranks,
// each holding one span (contiguous) or two (zigzag: ranks a..b hold
// chunks a..b and 2 size - 1 - b .. 2 size - 1 - a).
std::vector<PositionSpan> HolderPositions(int64_t n, int size,
                                          SequenceLayout layout, int origin,
                                          int first, int last) {
  std::vector<PositionSpan> positions;
  const auto add_run = [&](int a, int b) {
    const std::vector<PositionSpan> low = RankSpans(n, size, a, layout);
    const std::vector<PositionSpan> high = RankSpans(n, size, b, layout);
    positions.push_back({low[0].begin, high[0].end});
    if (layout == SequenceLayout::kZigzag) {
      positions.push_back({high[1].begin, low[1].end});
    }
  };
  const int a = (origin + first) % size, b = (origin + last) % size;
  if (a <= b) {
    add_run(a, b);
  } else {
    add_run(a, size - 1);
    add_run(0, b);
  }
  return positions;
}

// One chunk's trip around the ring, worked out on demand and alike on
// every rank: at step s the rank origin + s (mod size) holds it. From step 1
// it travels in the layout of the keys that the holders of steps s .. size
// - 1 use, so later layouts hold subsets of earlier ones' keys. Every
// question is one pass over the chunk's tiles against the queries of a run
// of holders (a few for a binary search), never one per holder: a rank
// plans its steps in O(size log size) passes and O(size) memory.
class ChunkTrip {
 public:
  ChunkTrip(const AttentionProblem& p, int size, SequenceLayout layout,
            int origin)
      : p_(p),
        size_(size),
        layout_(layout),
        origin_(origin),
        whole_(TokenLayoutOf(RankSpans(p.n, size, origin, layout))) {}

  // The keys that the holders of steps first .. last use (1 <= first <=
  // last < size).
  UsedKeys Used(int first, int last) const {
    return FindUsedKeys(
        p_, HolderPositions(p_.n, size_, layout_, origin_, first, last),
        whole_);
  }

  // The last step whose holder uses the chunk (0 when no other rank does):
  // the keys of the holders of steps s .. size - 1 only shrink as s grows.
  int FinalStep() const {
    int lo = 0, hi = size_ - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (AnyKey(Used(mid, size_ - 1))) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }

  // The layout in which the chunk travels into `step` (1 <= step <= its
  // final step) and its holders from then on compute: per head, only the
  // keys that the holders of steps step .. size - 1 use, packed; or the
  // whole chunk when that is no more data.
  TokenLayout Layout(int step) const {
    const UsedKeys used = Used(step, size_ - 1);
    TokenLayout packed;
    packed.head_spans.resize(p_.heads);
    packed.head_row.resize(p_.heads);
    for (int64_t h = 0; h < p_.heads; ++h) {
      const std::vector<DilatedPattern>& patterns = p_.pattern.head_patterns[h];
      packed.head_row[h] = packed.rows;
      int64_t row = 0;
      for (size_t i = 0; i < patterns.size(); ++i) {
        const DilatedPattern& d = patterns[i];
        const int64_t w = d.segment_length, rate = d.dilation_rate;
        // One strided span per range, segment and span of the chunk.
        for (const PositionSpan& range : used[h][i]) {
          for (const LocalSpan& chunk : whole_.spans) {
            const int64_t lo = std::max(range.begin, chunk.begin);
            const int64_t hi = std::min(range.end, chunk.end);
            for (int64_t seg = lo / w; lo < hi && seg * w < hi; ++seg) {
              const int64_t selected = seg * w + d.offset;
              const int64_t from = std::max(lo, seg * w);
              const int64_t end = std::min(hi, std::min(p_.n, seg * w + w));
              const int64_t first =
                  from <= selected
                      ? selected
                      : selected + (from - selected + rate - 1) / rate * rate;
              if (first >= end) continue;
              packed.head_spans[h].push_back(
                  LocalSpan{first, end, row, rate, static_cast<int>(i)});
              row += (end - first + rate - 1) / rate;
            }
          }
        }
      }
      packed.rows += row;
    }
    if (packed.rows >= whole_.rows * p_.heads) return whole_;
    return packed;
  }

  // The first step of the run of steps up to `step` (>= 1) whose layouts
  // hold the same keys as `layout`, the layout of `step`.
  int RunStart(int step, const TokenLayout& layout) const {
    int lo = 1, hi = step;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (SameKeys(Layout(mid), layout)) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  }

 private:
  const AttentionProblem& p_;
  const int size_;
  const SequenceLayout layout_;
  const int origin_;
  const TokenLayout whole_;
};

// Rows of head_dim elements per batch entry in a buffer of `layout`.
int64_t RowsPerBatch(const AttentionProblem& p, const TokenLayout& layout) {
  return layout.packed() ? layout.rows : layout.rows * p.heads;
}

// For each row of head_dim elements of one batch entry of a `sub` buffer,
// the row of a `super` buffer that holds the same key (the same for every
// batch entry); `super` holds every key of `sub` (an earlier layout of the
// same chunk's trip, or the chunk's whole tokens).
std::vector<int64_t> RowMap(const AttentionProblem& p, const TokenLayout& sub,
                            const TokenLayout& super) {
  const int64_t rows = RowsPerBatch(p, sub);
  const int64_t stride = p.head_dim;
  std::vector<int64_t> map(rows, -1);
  for (int64_t h = 0; h < p.heads; ++h) {
    for (const LocalSpan& d : sub.SpansOf(h)) {
      const int64_t count = (d.end - d.begin + d.step - 1) / d.step;
      if (count == 0) continue;
      const int64_t last = d.begin + (count - 1) * d.step;
      const LocalSpan* from = nullptr;
      for (const LocalSpan& s : super.SpansOf(h)) {
        if ((s.pattern < 0 || s.pattern == d.pattern) && s.begin <= d.begin &&
            last < s.end && (d.begin - s.begin) % s.step == 0 &&
            d.step % s.step == 0) {
          from = &s;
          break;
        }
      }
      LC_CHECK(from != nullptr) << "no span holds keys " << d.begin << ".."
                                << last << " of head " << h;
      for (int64_t j = 0; j < count; ++j) {
        map[sub.Offset(p.heads, p.head_dim, 0, h, d.row + j) / stride] =
            super.Offset(p.heads, p.head_dim, 0, h,
                         from->RowOf(d.begin + j * d.step)) /
            stride;
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    LC_CHECK_GE(map[i], 0) << "row " << i << " of a trip layout has no key";
  }
  return map;
}

// Every row map of the plan, in one host buffer uploaded at once.
void MakeRowMaps(const AttentionProblem& p, RingPlan* plan) {
  std::vector<int64_t> all;
  std::vector<std::pair<Tensor*, std::pair<int64_t, int64_t>>> maps;
  const auto append = [&](Tensor* slot, const TokenLayout& sub,
                          const TokenLayout& super) {
    const std::vector<int64_t> map = RowMap(p, sub, super);
    const auto begin = static_cast<int64_t>(all.size());
    all.insert(all.end(), map.begin(), map.end());
    maps.push_back({slot, {begin, static_cast<int64_t>(all.size())}});
  };
  for (int s = 0; s <= plan->last_step; ++s) {
    const RingStep& step = plan->steps[s];
    if (step.forwarded && !step.carried_same) {
      append(&plan->carry_maps[s], step.carried, step.layout);
    }
    if (step.ours_come_home && !SameKeys(step.home, plan->mine)) {
      append(&plan->home_maps[s], step.home, plan->mine);
    }
  }
  if (all.empty()) return;
  Tensor host = Empty({static_cast<int64_t>(all.size())}, DType::kInt64);
  std::copy(all.begin(), all.end(), host.data<int64_t>());
  const Tensor uploaded = host.to(p.device);
  for (const auto& [slot, range] : maps) {
    *slot = uploaded.slice(0, range.first, range.second);
  }
}

}  // namespace

RingPlan MakeRingPlan(const AttentionProblem& p, int size, int rank,
                      SequenceLayout layout) {
  RingPlan plan;
  plan.size = size;
  plan.rank = rank;
  plan.mine = TokenLayoutOf(RankSpans(p.n, size, rank, layout));
  // Every rank loops to the same last step.
  std::vector<int> final_step(size);  // by origin
  for (int origin = 0; origin < size; ++origin) {
    final_step[origin] = ChunkTrip(p, size, layout, origin).FinalStep();
    plan.last_step = std::max(plan.last_step, final_step[origin]);
  }
  plan.steps.resize(plan.last_step + 2);
  for (int s = 0; s <= plan.last_step; ++s) {
    RingStep& step = plan.steps[s];
    step.origin = plan.Origin(rank, s);
    const int last = final_step[step.origin];
    if (s > last) continue;
    const ChunkTrip trip(p, size, layout, step.origin);
    step.held = true;
    step.forwarded = s < last;
    if (step.forwarded) step.carried = trip.Layout(s + 1);
    step.layout = s == 0 ? plan.mine : trip.Layout(s);
    step.carried_same = step.forwarded && SameKeys(step.layout, step.carried);
    if (s == 0) {
      step.needs = AnyKey(
          FindUsedKeys(p, RankSpans(p.n, size, rank, layout), plan.mine));
      continue;
    }
    step.needs = AnyKey(trip.Used(s, s));
    // Accumulators arrive when they exist at step s - 1 in the same
    // layout: some holder of that run of steps used the chunk.
    const int start = trip.RunStart(s, step.layout);
    step.grads_in = start < s && AnyKey(trip.Used(start, s - 1));
    const bool live = step.grads_in || step.needs;
    step.grads_on = live && step.carried_same;
    step.grads_home = live && !step.grads_on;
  }
  // This rank's own chunk, step by step along its trip: where its
  // accumulators come home.
  const int own_last = final_step[rank];
  const ChunkTrip own(p, size, layout, rank);
  TokenLayout at = own_last >= 1 ? own.Layout(1) : TokenLayout();
  bool came_on = false;
  for (int s = 1; s <= own_last; ++s) {
    TokenLayout next = s < own_last ? own.Layout(s + 1) : TokenLayout();
    const bool live = came_on || AnyKey(own.Used(s, s));
    came_on = live && s < own_last && SameKeys(at, next);
    if (live && !came_on) {
      plan.steps[s].ours_come_home = true;
      plan.steps[s].home = at;
    }
    at = std::move(next);
  }
  MakeRowMaps(p, &plan);
  return plan;
}

Shape ChunkShape(const AttentionProblem& p, const TokenLayout& layout) {
  if (layout.packed()) return {p.batch, layout.rows, p.head_dim};
  return {p.batch, layout.rows, p.heads, p.head_dim};
}

std::vector<TensorSpec> ChunkSpecs(const AttentionProblem& p,
                                   const TokenLayout& layout, DType dtype,
                                   Device device) {
  return std::vector<TensorSpec>(
      2, TensorSpec{ChunkShape(p, layout), dtype, device});
}

}  // namespace lc
