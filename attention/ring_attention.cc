#include "attention/ring_attention.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention/attention_cuda_plan.h"
#include "attention/attention_kernel.h"
#include "core/autograd.h"
#include "core/status.h"
#include "distributed/ring_exchange.h"
#include "ops/shape_ops_cuda.h"

namespace lc {
namespace {

// Message tags: each kind of payload has its own exchange and tags, so K, V
// and their gradients never share a receive buffer.
enum Tag : int {
  kKeyValueTags = 1,  // K, V
  kGradTags = 3,      // dK, dV on to the next holder
  kHomeTags = 5,      // dK, dV back to the chunk's owner
};

// Position ranges [begin, end), sorted and disjoint.
using Ranges = std::vector<PositionRange>;

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
            [](const PositionRange& a, const PositionRange& b) {
              return a.begin < b.begin;
            });
  Ranges merged;
  for (const PositionRange& r : ranges) {
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
        for (const PositionRange& range : used[h][i]) {
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

// What one rank does at one ring step, forward and backward alike.
struct RingStep {
  int origin = 0;             // whose chunk it holds: (rank - step) mod size
  bool held = false;          // the chunk gets here (a holder here or later
                              // uses it)
  bool needs = false;         // this rank's queries use keys of it
  bool forwarded = false;     // it goes on to rank + 1 (a later holder uses it)
  TokenLayout layout;         // held: the layout it is held in
  TokenLayout carried;        // forwarded: the layout it goes on in
  bool carried_same = false;  // forwarded in the layout it is held in
  // Backward: the chunk's dK/dV accumulators come with it from rank - 1,
  // go on with it, or go home to its origin after this step. They exist
  // from the first holder (step >= 1) that uses the chunk; they go on while
  // the chunk keeps its layout, and home when it changes (the next holders
  // use fewer keys and start new accumulators) or the trip ends.
  bool grads_in = false, grads_on = false, grads_home = false;
  // This rank's own accumulators come home at this step, in layout `home`.
  bool ours_come_home = false;
  TokenLayout home;
};

// This rank's part of the ring: its steps, derived identically on every
// rank (so that senders and receivers agree on every transfer and its size
// without asking each other), in O(size) memory.
struct RingPlan {
  int size = 1, rank = 0;
  TokenLayout mine;   // this rank's tokens
  int last_step = 0;  // the last ring step any rank computes
  // Steps 0 .. last_step, then one that holds nothing (the "next" of the
  // last step).
  std::vector<RingStep> steps;

  int Origin(int holder, int step) const {
    return ((holder - step) % size + size) % size;
  }
  int Holder(int origin, int step) const { return (origin + step) % size; }
};

RingPlan MakePlan(const AttentionProblem& p, int size, int rank,
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
  return plan;
}

// The shape of a K/V chunk (or gradient) buffer of `layout`.
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

// Calls fn(sub_offset, super_offset) for every (batch, head, key) row of
// `sub`, with the element offsets of that row in a buffer of `sub` and in
// one of `super`, which holds every key of `sub` (an earlier layout of the
// same chunk's trip, or the chunk's whole tokens).
template <typename Fn>
void ForEachRowPair(const AttentionProblem& p, const TokenLayout& sub,
                    const TokenLayout& super, Fn&& fn) {
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
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t j = 0; j < count; ++j) {
          fn(sub.Offset(p.heads, p.head_dim, b, h, d.row + j),
             super.Offset(p.heads, p.head_dim, b, h,
                          from->RowOf(d.begin + j * d.step)));
        }
      }
    }
  }
}

// The K/V pair of a chunk held in `from`, cut down to the keys of `to` (a
// later layout of its trip): the tensors themselves when those are the same
// keys, else new packed copies.
template <typename T>
std::vector<Tensor> Carry(const AttentionProblem& p, const TokenLayout& from,
                          const std::vector<Tensor>& tensors,
                          const TokenLayout& to) {
  if (SameKeys(from, to)) return tensors;
  std::vector<Tensor> packed;
  for (const Tensor& t : tensors) {
    Tensor c = Empty(ChunkShape(p, to), t.dtype());
    const T* src = t.data<T>();
    T* dst = c.data<T>();
    ForEachRowPair(p, to, from, [&](int64_t to_at, int64_t from_at) {
      std::memcpy(dst + to_at, src + from_at, p.head_dim * sizeof(T));
    });
    packed.push_back(c);
  }
  return packed;
}

// dst (a buffer of `whole`, this rank's tokens) += src (one of `part`).
template <typename T>
void AddRows(const AttentionProblem& p, const TokenLayout& part,
             const Tensor& src, const TokenLayout& whole, const Tensor& dst) {
  const T* s = src.data<T>();
  T* d = dst.data<T>();
  ForEachRowPair(p, part, whole, [&](int64_t part_at, int64_t whole_at) {
    for (int64_t c = 0; c < p.head_dim; ++c) d[whole_at + c] += s[part_at + c];
  });
}

// Rows of head_dim elements per batch entry in a buffer of `layout`.
int64_t RowsPerBatch(const AttentionProblem& p, const TokenLayout& layout) {
  return layout.packed() ? layout.rows : layout.rows * p.heads;
}

// For each row of head_dim elements of one batch entry of a `sub` buffer,
// the row of a `super` buffer that holds the same key (ForEachRowPair's
// pairs as row indices; the same for every batch entry).
std::vector<int64_t> RowMap(const AttentionProblem& p, const TokenLayout& sub,
                            const TokenLayout& super) {
  const int64_t rows = RowsPerBatch(p, sub);
  std::vector<int64_t> map(rows, -1);
  ForEachRowPair(p, sub, super, [&](int64_t sub_at, int64_t super_at) {
    if (sub_at < rows * p.head_dim) {
      map[sub_at / p.head_dim] = super_at / p.head_dim;
    }
  });
  for (int64_t i = 0; i < rows; ++i) {
    LC_CHECK_GE(map[i], 0) << "row " << i << " of a trip layout has no key";
  }
  return map;
}

// fn(T{}) for T the C++ type of a CPU dtype of the drivers: float (float32)
// or double (float64).
template <typename Fn>
auto DispatchCpu(DType dtype, Fn&& fn) {
  return dtype == DType::kFloat32 ? fn(float{}) : fn(double{});
}

// The computation of ring steps on the inputs' device, for one rank: the
// CPU drivers (float32 or float64; the caller converts bfloat16) or the
// CUDA drivers (bfloat16, float32 or float64 inputs). out, lse and the
// gradient accumulators (dQ, and dK/dV that travel) are of acc(): the
// inputs' dtype on the CPU, CudaAccumulatorDType on CUDA. On CUDA every
// kernel is queued on the current stream, and the host work and uploads are
// done before the ring loop (the row maps of this rank's cut-down copies and
// home-coming accumulators and the forward's work lists at construction,
// the backward's in PrepareBackward), so the loop never waits for the
// device. Each call plans and uploads again (see CachedCudaWorkList).
class RingKernels {
 public:
  RingKernels(std::shared_ptr<const AttentionProblem> p,
              std::shared_ptr<const RingPlan> plan, DType dtype, Device device)
      : p_(std::move(p)),
        plan_(std::move(plan)),
        dtype_(dtype),
        device_(device) {
    if (device_.is_cuda()) PrepareCuda();
  }

  DType dtype() const { return dtype_; }
  DType acc() const {
    return device_.is_cuda() ? CudaAccumulatorDType(dtype_) : dtype_;
  }
  Device device() const { return device_; }
  const TokenLayout& mine() const { return plan_->mine; }

  // The K/V pair of the chunk held at `step`, in its layout of that step,
  // cut down to the layout it goes on in.
  std::vector<Tensor> Carry(int step, const std::vector<Tensor>& kv) const {
    const TokenLayout& from = plan_->steps[step].layout;
    const TokenLayout& to = plan_->steps[step].carried;
    if (!device_.is_cuda()) {
      return DispatchCpu(dtype_, [&](auto tag) {
        return lc::Carry<decltype(tag)>(*p_, from, kv, to);
      });
    }
    // PrepareCuda made a map exactly where the layout changes.
    const auto found = carry_maps_.find(step);
    if (found == carry_maps_.end()) return kv;
    const Tensor& map = found->second;
    std::vector<Tensor> packed;
    for (const Tensor& t : kv) {
      Tensor c = Empty(ChunkShape(*p_, to), t.dtype(), device_);
      internal::GatherRowsCuda(t, map, p_->batch, RowsPerBatch(*p_, from),
                               p_->head_dim, c);
      packed.push_back(c);
    }
    return packed;
  }

  // Merges this rank's queries' attention over the keys of `kl` into out
  // and lse.
  void Forward(const Tensor& q, const TokenLayout& kl,
               const std::vector<Tensor>& kv, const Tensor& out,
               const Tensor& lse) const {
    if (device_.is_cuda()) {
      AttentionForwardTilesCuda(*p_, mine(), q, kl, kv[0], kv[1], out, lse);
      return;
    }
    DispatchCpu(dtype_, [&](auto tag) {
      using T = decltype(tag);
      AttentionForwardTiles<T>(*p_, mine(), q.data<T>(), kl, kv[0].data<T>(),
                               kv[1].data<T>(), out.data<T>(), lse.data<T>());
      return 0;
    });
  }

  // RowDelta of this rank's out and grad_out (of the inputs' dtype):
  // [batch, heads, rows] of acc().
  Tensor Delta(const Tensor& out, const Tensor& grad_out) const {
    const int64_t rows = mine().rows;
    Tensor delta = Empty({p_->batch, p_->heads, rows}, acc(), device_);
    if (device_.is_cuda()) {
      RowDeltaCuda(*p_, rows, out, grad_out, delta);
      return delta;
    }
    DispatchCpu(dtype_, [&](auto tag) {
      using T = decltype(tag);
      RowDelta<T>(*p_, rows, out.data<T>(), grad_out.data<T>(),
                  delta.data<T>());
      return 0;
    });
    return delta;
  }

  // Adds the gradients of this rank's queries against the keys of `kl`
  // into dq and grads (dK, dV of `kl`).
  void Backward(const Tensor& q, const TokenLayout& kl,
                const std::vector<Tensor>& kv, const Tensor& grad_out,
                const Tensor& lse, const Tensor& delta, const Tensor& grad_lse,
                const Tensor& dq, const std::vector<Tensor>& grads) const {
    if (device_.is_cuda()) {
      AttentionBackwardTilesCuda(*p_, mine(), q, kl, kv[0], kv[1], grad_out,
                                 lse, delta, grad_lse, dq, grads[0], grads[1]);
      return;
    }
    DispatchCpu(dtype_, [&](auto tag) {
      using T = decltype(tag);
      AttentionBackwardTiles<T>(*p_, mine(), q.data<T>(), kl, kv[0].data<T>(),
                                kv[1].data<T>(), grad_out.data<T>(),
                                lse.data<T>(), delta.data<T>(),
                                grad_lse.data<T>(), dq.data<T>(),
                                grads[0].data<T>(), grads[1].data<T>());
      return 0;
    });
  }

  // dst (a buffer of this rank's tokens) += src, this rank's accumulator
  // that came home at `step` in its trip layout of that step.
  void AddHome(int step, const Tensor& src, const Tensor& dst) const {
    const TokenLayout& part = plan_->steps[step].home;
    if (!device_.is_cuda()) {
      DispatchCpu(dtype_, [&](auto tag) {
        AddRows<decltype(tag)>(*p_, part, src, mine(), dst);
        return 0;
      });
      return;
    }
    const auto found = home_maps_.find(step);
    if (found == home_maps_.end()) {  // home in this rank's own layout
      AddInPlace(dst, src);
      return;
    }
    // The accumulator scattered into a zeroed buffer of this rank's tokens
    // (each of its rows goes to a distinct row), then added.
    const Tensor spread = Empty(dst.shape(), dst.dtype(), device_);
    internal::IndexAddRowsCuda(src, found->second, p_->batch,
                               RowsPerBatch(*p_, mine()), p_->head_dim, spread);
    AddInPlace(dst, spread);
  }

  // CUDA: builds the key work lists of every step that backward computes.
  void PrepareBackward() const {
    if (device_.is_cuda()) PrepareWorkLists(CudaWorkKind::kKeyItems);
  }

 private:
  // Builds the work lists of `kind` for every step this rank computes.
  void PrepareWorkLists(CudaWorkKind kind) const {
    for (int s = 0; s <= plan_->last_step; ++s) {
      const RingStep& step = plan_->steps[s];
      if (step.needs) {
        p_->cuda_plans->Get(*p_, mine(), step.layout, kind, device_);
      }
    }
  }

  void PrepareCuda() {
    // Every row map this rank uses, in one host buffer uploaded at once:
    // where each goes, and its [begin, end) in the buffer.
    std::vector<int64_t> all;
    std::vector<std::pair<Tensor*, std::pair<int64_t, int64_t>>> maps;
    const auto append = [&](Tensor* slot, const TokenLayout& sub,
                            const TokenLayout& super) {
      const std::vector<int64_t> map = RowMap(*p_, sub, super);
      const auto begin = static_cast<int64_t>(all.size());
      all.insert(all.end(), map.begin(), map.end());
      maps.push_back({slot, {begin, static_cast<int64_t>(all.size())}});
    };
    for (int s = 0; s <= plan_->last_step; ++s) {
      const RingStep& step = plan_->steps[s];
      if (step.forwarded && !step.carried_same) {
        append(&carry_maps_[s], step.carried, step.layout);
      }
      if (step.ours_come_home && !SameKeys(step.home, mine())) {
        append(&home_maps_[s], step.home, mine());
      }
    }
    if (!all.empty()) {
      Tensor host = Empty({static_cast<int64_t>(all.size())}, DType::kInt64);
      std::copy(all.begin(), all.end(), host.data<int64_t>());
      const Tensor uploaded = host.to(device_);
      for (const auto& [slot, range] : maps) {
        *slot = uploaded.slice(0, range.first, range.second);
      }
    }
    PrepareWorkLists(CudaWorkKind::kQueryItems);
  }

  std::shared_ptr<const AttentionProblem> p_;
  std::shared_ptr<const RingPlan> plan_;
  DType dtype_;
  Device device_;
  // CUDA row maps (int64 on the device), by step: of the cut-down copy of
  // the chunk held at that step; of this rank's accumulators coming home at
  // that step.
  std::map<int, Tensor> carry_maps_;
  std::map<int, Tensor> home_maps_;
};

// Throws a failed communication as lc::Error naming the rank (the exchange
// has already aborted the group, so the other ranks stop waiting).
void Check(const Communicator& comm, const absl::Status& status) {
  if (!status.ok()) {
    throw Error(absl::Status(
        status.code(), absl::StrCat("RingAttention on rank ", comm.rank(), ": ",
                                    status.message())));
  }
}

template <typename V>
V Check(const Communicator& comm, absl::StatusOr<V> value) {
  Check(comm, value.status());
  return *std::move(value);
}

// The tensors of the chunk a rank holds at one step (K and V; in backward
// dK and dV too), in the layout of its RingStep.
struct HeldChunk {
  std::vector<Tensor> kv;
  std::vector<Tensor> grads;
};

void AddStats(RingStats* stats, const RingExchange& exchange) {
  if (stats == nullptr) return;
  stats->bytes_sent += exchange.bytes_sent();
  stats->transfers += exchange.tensors_sent();
}

void CountStep(RingStats* stats, bool computed) {
  if (stats == nullptr) return;
  ++(computed ? stats->steps_computed : stats->steps_skipped);
}

// Forward: at each step the next chunk is posted (sent on, received from
// the previous rank) before this step's chunk is computed on, so the
// transfer overlaps the compute; on CUDA the compute stream waits for the
// transfer (on the device) only at the end of the step, before the next
// step's kernels that read the chunk.
void RingForward(Communicator& comm, const AttentionProblem& p,
                 const RingPlan& plan, const RingKernels& kernels,
                 const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& out, const Tensor& lse, RingStats* stats) {
  RingExchange kv(comm, 2, kKeyValueTags);
  HeldChunk cur{{k, v}, {}};
  for (int s = 0; s <= plan.last_step; ++s) {
    const RingStep& step = plan.steps[s];
    const RingStep& next_step = plan.steps[s + 1];
    // The next chunk moves while this one is computed on.
    std::vector<Tensor> send;
    if (step.forwarded) send = kernels.Carry(s, cur.kv);
    std::vector<TensorSpec> receive;
    if (next_step.held) {
      receive =
          ChunkSpecs(p, next_step.layout, kernels.dtype(), kernels.device());
    }
    HeldChunk next;
    next.kv = Check(comm, kv.Post(send, receive));
    if (step.needs) kernels.Forward(q, step.layout, cur.kv, out, lse);
    CountStep(stats, step.needs);
    Check(comm, kv.Wait());
    cur = std::move(next);
  }
  AddStats(stats, kv);
}

// Backward: K and V travel again as in forward. A holder adds the
// gradients of its step into dK/dV accumulators in the chunk's layout,
// which travel as RingPlan::grads_on and grads_home say. The owner keeps
// its own step's gradients and adds every accumulator that comes home.
// Returns dq, dk, dv of kernels.acc().
Tensors RingBackward(Communicator& comm, const AttentionProblem& p,
                     const RingPlan& plan, const RingKernels& kernels,
                     const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse,
                     const Tensor& grad_out, const Tensor& grad_lse,
                     RingStats* stats) {
  const int r = plan.rank;
  kernels.PrepareBackward();
  const Tensor delta = kernels.Delta(out, grad_out);
  const DType acc = kernels.acc();
  const Device device = kernels.device();
  Tensor dq = Zeros(q.shape(), acc, device), dk = Zeros(k.shape(), acc, device),
         dv = Zeros(v.shape(), acc, device);
  RingExchange kv(comm, 2, kKeyValueTags), grads(comm, 2, kGradTags),
      home(comm, 2, kHomeTags);
  HeldChunk cur{{k, v}, {dk, dv}};
  for (int s = 0; s <= plan.last_step; ++s) {
    const RingStep& step = plan.steps[s];
    const RingStep& next_step = plan.steps[s + 1];
    std::vector<Tensor> send;
    if (step.forwarded) send = kernels.Carry(s, cur.kv);
    std::vector<TensorSpec> receive;
    if (next_step.held) {
      receive = ChunkSpecs(p, next_step.layout, kernels.dtype(), device);
    }
    HeldChunk next;
    next.kv = Check(comm, kv.Post(send, receive));
    if (step.needs) {
      kernels.Backward(q, step.layout, cur.kv, grad_out, lse, delta, grad_lse,
                       dq, cur.grads);
    }
    CountStep(stats, step.needs);

    // The accumulators leave only after this step added to them: on to the
    // next holder, or home; ours come home from the rank holding our chunk
    // now when they end there.
    next.grads = Check(
        comm, grads.Post(step.grads_on ? cur.grads : std::vector<Tensor>(),
                         next_step.grads_in
                             ? ChunkSpecs(p, next_step.layout, acc, device)
                             : std::vector<TensorSpec>()));
    const std::vector<Tensor> came_home = Check(
        comm,
        home.PostPeers(
            step.grads_home ? cur.grads : std::vector<Tensor>(), step.origin,
            step.ours_come_home ? ChunkSpecs(p, step.home, acc, device)
                                : std::vector<TensorSpec>(),
            plan.Holder(r, s)));
    Check(comm, kv.Wait());
    Check(comm, grads.Wait());
    Check(comm, home.Wait());
    if (step.ours_come_home) {
      kernels.AddHome(s, came_home[0], dk);
      kernels.AddHome(s, came_home[1], dv);
    }
    // A holder that uses the chunk and got no accumulators starts its own.
    if (!next_step.grads_in && next_step.needs) {
      next.grads = {Zeros(ChunkShape(p, next_step.layout), acc, device),
                    Zeros(ChunkShape(p, next_step.layout), acc, device)};
    }
    cur = std::move(next);
  }
  AddStats(stats, kv);
  AddStats(stats, grads);
  AddStats(stats, home);
  return {dq, dk, dv};
}

// ---- Agreement across ranks ----

// 64-bit FNV-1a of a sequence of integers and bytes.
class Fingerprint {
 public:
  void Add(int64_t x) {
    for (int i = 0; i < 8; ++i) AddByte(static_cast<uint8_t>(x >> (8 * i)));
  }
  void AddBytes(const uint8_t* data, int64_t count) {
    for (int64_t i = 0; i < count; ++i) AddByte(data[i]);
  }
  int64_t value() const { return static_cast<int64_t>(hash_); }

 private:
  void AddByte(uint8_t byte) { hash_ = (hash_ ^ byte) * 1099511628211ull; }
  uint64_t hash_ = 14695981039346656037ull;
};

int64_t PatternFingerprint(const AttentionPattern& pattern) {
  Fingerprint f;
  f.Add(static_cast<int64_t>(pattern.head_patterns.size()));
  for (const std::vector<DilatedPattern>& head : pattern.head_patterns) {
    f.Add(static_cast<int64_t>(head.size()));
    for (const DilatedPattern& d : head) {
      f.Add(d.segment_length);
      f.Add(d.dilation_rate);
      f.Add(d.offset);
    }
  }
  return f.value();
}

int64_t BlockMaskFingerprint(const BlockMask* mask) {
  Fingerprint f;
  f.Add(mask != nullptr);
  if (mask != nullptr) {
    f.Add(mask->block_size());
    f.Add(mask->num_blocks());
    for (int64_t b : mask->row_begin()) f.Add(b);
    for (int32_t k : mask->keys()) f.Add(k);
  }
  return f.value();
}

int64_t PaddingFingerprint(const Tensor& padding) {
  Fingerprint f;
  f.Add(padding.defined());
  if (padding.defined()) {
    const Tensor host = padding.to(Device::Cpu());
    f.AddBytes(host.data<uint8_t>(), host.numel());
  }
  return f.value();
}

int64_t DoubleBits(double x) {
  int64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

enum class FieldKind { kInteger, kDType, kLayout, kBool, kReal, kFingerprint };

// One value of a call that every rank must pass alike (or, when not
// `compared`, whose rank-0 value every rank takes).
struct Field {
  const char* name;
  FieldKind kind;
  int64_t value;
  bool compared = true;
};

std::string DescribeField(FieldKind kind, int64_t value) {
  switch (kind) {
    case FieldKind::kDType:
      return DTypeName(static_cast<DType>(value));
    case FieldKind::kLayout:
      return SequenceLayoutName(static_cast<SequenceLayout>(value));
    case FieldKind::kBool:
      return value != 0 ? "true" : "false";
    case FieldKind::kReal: {
      double x;
      std::memcpy(&x, &value, sizeof(x));
      return absl::StrCat(x);
    }
    case FieldKind::kFingerprint:
      return absl::StrCat("fingerprint ", absl::Hex(value, absl::kZeroPad16));
    case FieldKind::kInteger:
      break;
  }
  return absl::StrCat(value);
}

std::vector<Field> CallFields(const AttentionProblem& p, DType dtype,
                              SequenceLayout layout) {
  return {
      {"batch", FieldKind::kInteger, p.batch},
      {"heads", FieldKind::kInteger, p.heads},
      {"head_dim", FieldKind::kInteger, p.head_dim},
      {"dtype", FieldKind::kDType, static_cast<int64_t>(dtype)},
      {"n", FieldKind::kInteger, p.n},
      {"layout", FieldKind::kLayout, static_cast<int64_t>(layout)},
      {"causal", FieldKind::kBool, p.plan.causal},
      {"pattern", FieldKind::kFingerprint, PatternFingerprint(p.pattern)},
      {"block mask", FieldKind::kFingerprint,
       BlockMaskFingerprint(p.pattern.block_mask.get())},
      {"scale", FieldKind::kReal, DoubleBits(p.scale)},
      {"dropout", FieldKind::kReal, DoubleBits(p.dropout)},
      {"dropout offset", FieldKind::kInteger,
       static_cast<int64_t>(p.dropout_offset)},
      {"key_padding_mask", FieldKind::kFingerprint,
       PaddingFingerprint(p.key_padding)},
      // Each rank's generator has its own seed (a trainer seeds every rank's
      // thread apart, for the dropout of its own tokens); the ring draws
      // rank 0's stream.
      {"dropout seed", FieldKind::kInteger,
       static_cast<int64_t>(p.dropout_seed), /*compared=*/false},
  };
}

// Gathers every rank's `fields` and throws lc::Error (InvalidArgument, on
// every rank alike) naming the first compared field on which the ranks
// disagree and each rank's value; a failed gather aborts the group and
// throws. Returns rank 0's values.
std::vector<int64_t> CheckRanksAgree(Communicator& comm,
                                     const std::vector<Field>& fields,
                                     Device device) {
  const int size = comm.size();
  const auto count = static_cast<int64_t>(fields.size());
  Tensor mine = Empty({count}, DType::kInt64);
  for (int64_t i = 0; i < count; ++i) {
    mine.data<int64_t>()[i] = fields[i].value;
  }
  const Tensor all = Empty({size, count}, DType::kInt64, device);
  const absl::Status gathered = comm.AllGather(mine.to(device), all);
  if (!gathered.ok()) comm.Abort(gathered);
  Check(comm, gathered);
  const Tensor host = all.to(Device::Cpu());
  const int64_t* values = host.data<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    if (!fields[i].compared) continue;
    // Ranks grouped by their value, in order of first appearance.
    std::vector<std::pair<int64_t, std::vector<int>>> groups;
    for (int r = 0; r < size; ++r) {
      const int64_t value = values[r * count + i];
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const auto& g) { return g.first == value; });
      if (it == groups.end()) {
        groups.push_back({value, {r}});
      } else {
        it->second.push_back(r);
      }
    }
    if (groups.size() == 1) continue;
    std::string detail;
    for (const auto& [value, ranks] : groups) {
      absl::StrAppend(&detail, detail.empty() ? "" : "; ",
                      DescribeField(fields[i].kind, value), " on rank",
                      ranks.size() > 1 ? "s " : " ",
                      absl::StrJoin(ranks, ", "));
    }
    throw Error(absl::InvalidArgumentError(absl::StrCat(
        "RingAttention on rank ", comm.rank(), ": the ranks disagree on ",
        fields[i].name, " (", detail,
        "); every rank must pass the same shapes (but for its own tokens), "
        "dtype, n, layout, pattern and options")));
  }
  return std::vector<int64_t>(values, values + count);
}

// RingAttention on inputs the drivers take (float32 or float64 on the CPU;
// also bfloat16 on CUDA); `dtype` is the caller's. out has the inputs'
// dtype, lse the accumulator dtype.
AttentionResult RingAttentionOf(Communicator& comm, const Tensor& q,
                                const Tensor& k, const Tensor& v, int64_t n,
                                const AttentionPattern& pattern,
                                const AttentionOptions& options,
                                const RingOptions& ring, DType dtype) {
  const int size = comm.size(), rank = comm.rank();
  std::shared_ptr<const AttentionProblem> p =
      MakeAttentionProblem(q, k, v, n, pattern, options);
  if (size > 1) {
    const std::vector<Field> fields = CallFields(*p, dtype, ring.layout);
    const std::vector<int64_t> first =
        CheckRanksAgree(comm, fields, q.device());
    // Dropout draws rank 0's stream on every rank (see RingAttention).
    const size_t seed_at =
        std::find_if(fields.begin(), fields.end(),
                     [](const Field& f) {
                       return std::strcmp(f.name, "dropout seed") == 0;
                     }) -
        fields.begin();
    const auto seed = static_cast<uint64_t>(first[seed_at]);
    if (p->dropout > 0 && p->dropout_seed != seed) {
      auto shared = std::make_shared<AttentionProblem>(*p);
      shared->dropout_seed = seed;
      p = std::move(shared);
    }
  }
  auto plan =
      std::make_shared<const RingPlan>(MakePlan(*p, size, rank, ring.layout));
  auto kernels =
      std::make_shared<const RingKernels>(p, plan, q.dtype(), q.device());
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const DType acc = kernels->acc();
  Tensor out = Zeros(q.shape(), acc, q.device());
  Tensor lse = Full({p->batch, p->heads, q.size(1)},
                    -std::numeric_limits<double>::infinity(), acc, q.device());
  RingForward(comm, *p, *plan, *kernels, qc, kc, vc, out, lse, ring.stats);
  if (acc != q.dtype()) out = out.to(q.dtype());
  if (NeedsGrad({qc, kc, vc})) {
    Communicator* comm_ptr = &comm;
    RingStats* stats = ring.stats;
    RecordOp("RingAttention", {qc, kc, vc}, {&out, &lse},
             /*saved=*/{qc, kc, vc, out, lse},
             [comm_ptr, stats, p, plan, kernels, q = qc.detach(),
              k = kc.detach(), v = vc.detach(), out = out.detach(),
              lse = lse.detach()](const Tensors& g) -> Tensors {
               Tensors grads = RingBackward(*comm_ptr, *p, *plan, *kernels, q,
                                            k, v, out, lse, g[0].contiguous(),
                                            g[1].contiguous(), stats);
               for (Tensor& grad : grads) {
                 if (grad.dtype() != q.dtype()) grad = grad.to(q.dtype());
               }
               return grads;
             });
  }
  return {out, lse};
}

// RingAttention as this rank runs it; an lc::Error it throws is this rank's
// alone until RingAttention aborts the group with it.
AttentionResult RingAttentionOnRank(Communicator& comm, const Tensor& q,
                                    const Tensor& k, const Tensor& v, int64_t n,
                                    const AttentionPattern& pattern,
                                    const AttentionOptions& options,
                                    const RingOptions& ring) {
  const int size = comm.size(), rank = comm.rank();
  LC_REQUIRE(q.defined() && q.dim() == 4, "RingAttention: q has shape ",
             q.defined() ? ShapeToString(q.shape()) : "undefined",
             " (expected [batch, n_local, heads, head_dim])");
  const int64_t local = RankTokenCount(n, size, rank, ring.layout);
  LC_REQUIRE(q.size(1) == local, "RingAttention: rank ", rank, " of ", size,
             " holds ", q.size(1), " tokens but the ",
             SequenceLayoutName(ring.layout), " layout of n = ", n,
             " gives it ", local);
  // On the CPU bfloat16 computes in float32; the CUDA drivers take it.
  if (q.device().is_cpu() && q.dtype() == DType::kBFloat16 && k.defined() &&
      v.defined() && k.dtype() == q.dtype() && v.dtype() == q.dtype()) {
    AttentionResult r = RingAttentionOf(
        comm, q.to(DType::kFloat32), k.to(DType::kFloat32),
        v.to(DType::kFloat32), n, pattern, options, ring, q.dtype());
    return {r.out.to(DType::kBFloat16), r.lse};
  }
  return RingAttentionOf(comm, q, k, v, n, pattern, options, ring, q.dtype());
}

}  // namespace

AttentionResult RingAttention(Communicator& comm, const Tensor& q,
                              const Tensor& k, const Tensor& v, int64_t n,
                              const AttentionPattern& pattern,
                              const AttentionOptions& options,
                              const RingOptions& ring) {
  // An error found on this rank alone (a bad input, before any
  // communication) aborts the group with it, so that every rank fails at
  // once: peers waiting in the agreement check would otherwise block until
  // the timeout, which is what happens to ranks that RunRanks does not run
  // (processes of their own). Errors inside the ring abort it already.
  try {
    return RingAttentionOnRank(comm, q, k, v, n, pattern, options, ring);
  } catch (const Error& e) {
    comm.Abort(e.status());
    throw;
  }
}

}  // namespace lc
