#include "attention/attention_cuda_plan.h"

#include <algorithm>
#include <limits>
#include <tuple>

#include "core/check.h"
#include "core/cuda.h"

namespace lc {
namespace {

// One tile of the plan: the item side (queries for query items, keys for
// key items) and the other side, both in local rows.
struct Record {
  int32_t pattern, head;
  CudaTileRows own, other;
};

int32_t Narrow(int64_t x) {
  LC_CHECK(x >= 0 && x <= std::numeric_limits<int32_t>::max()) << x;
  return static_cast<int32_t>(x);
}

// The tile rows `rows` (inside `span`) as local rows of head h of a buffer
// of `layout` (a packed layout's rows count from the head's first row).
CudaTileRows Local(const TileRows& rows, const LocalSpan& span,
                   const TokenLayout& layout, int64_t h) {
  LC_CHECK_EQ(rows.step % span.step, 0) << "tile rows between span rows";
  CudaTileRows r;
  r.row = Narrow((layout.packed() ? layout.head_row[h] : 0) +
                 span.RowOf(rows.position));
  r.position = Narrow(rows.position);
  r.row_step = Narrow(rows.step / span.step);
  r.position_step = Narrow(rows.step);
  r.count = Narrow(rows.count);
  return r;
}

// Rows of `other` that pair with `own` before masks: with causality only the
// keys up to the last query (query items) or the queries from the first key
// (key items). Used to schedule the costliest items first.
int64_t Cost(const CudaTileRows& own, const CudaTileRows& other, bool causal,
             CudaWorkKind kind) {
  if (!causal) return other.count;
  if (kind == CudaWorkKind::kQueryItems) {
    const int64_t last =
        own.position + int64_t{own.count - 1} * own.position_step;
    return std::min<int64_t>(other.count,
                             (last - other.position) / other.position_step + 1);
  }
  const int64_t before = std::max<int64_t>(
      0, (own.position - other.position + other.position_step - 1) /
             other.position_step);
  return std::max<int64_t>(0, other.count - before);
}

// Appends everything of `layout` that a work list depends on to a key.
void AppendLayoutKey(const TokenLayout& layout, std::vector<int64_t>* key) {
  auto append = [key](const std::vector<LocalSpan>& spans) {
    key->push_back(static_cast<int64_t>(spans.size()));
    for (const LocalSpan& s : spans) {
      key->insert(key->end(), {s.begin, s.end, s.row, s.step, s.pattern});
    }
  };
  key->push_back(layout.rows);
  append(layout.spans);
  key->push_back(static_cast<int64_t>(layout.head_spans.size()));
  for (size_t h = 0; h < layout.head_spans.size(); ++h) {
    key->push_back(layout.head_row[h]);
    append(layout.head_spans[h]);
  }
}

}  // namespace

CudaWorkListHost BuildCudaWorkList(const AttentionProblem& p,
                                   const TokenLayout& ql, const TokenLayout& kl,
                                   CudaWorkKind kind) {
  const bool by_query = kind == CudaWorkKind::kQueryItems;
  TilePlanOptions options = p.plan;
  options.order = TileOrder::kRowMajor;
  options.query_tile =
      by_query ? kCudaQueryTileRows : std::max<int64_t>(p.n, 1);
  options.key_tile = by_query ? std::max<int64_t>(p.n, 1) : kCudaKeyTileRows;
  // Pattern by pattern, so that with one span per layout the records come
  // out in the order the items need (then the sort below has nothing to do).
  // A key span that holds one pattern's keys meets that pattern alone.
  LC_CHECK(!ql.packed()) << "queries come in a shared layout";
  std::vector<Record> records;
  for (int64_t pi = 0; pi < p.max_patterns; ++pi) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const std::vector<DilatedPattern>& patterns = p.pattern.head_patterns[h];
      if (pi >= static_cast<int64_t>(patterns.size())) continue;
      const std::vector<DilatedPattern> one = {patterns[pi]};
      for (const LocalSpan& qs : ql.spans) {
        LC_CHECK(qs.step == 1 && qs.pattern < 0) << "queries of every pattern";
        for (const LocalSpan& ks : kl.SpansOf(h)) {
          if (ks.pattern >= 0 && ks.pattern != pi) continue;
          ForEachTile(one, p.n, {qs.begin, qs.end}, {ks.begin, ks.end}, options,
                      [&](const Tile& tile) {
                        const CudaTileRows q = Local(tile.q, qs, ql, h);
                        const CudaTileRows k = Local(tile.k, ks, kl, h);
                        records.push_back(Record{
                            static_cast<int32_t>(pi), static_cast<int32_t>(h),
                            by_query ? q : k, by_query ? k : q});
                      });
        }
      }
    }
  }
  auto before = [](const Record& x, const Record& y) {
    return std::make_tuple(x.pattern, x.head, x.own.position,
                           x.other.position) <
           std::make_tuple(y.pattern, y.head, y.own.position, y.other.position);
  };
  if (!std::is_sorted(records.begin(), records.end(), before)) {
    std::sort(records.begin(), records.end(), before);
  }

  CudaWorkListHost list;
  std::vector<int64_t> costs;
  for (size_t i = 0; i < records.size();) {
    const Record& first = records[i];
    CudaWorkItem item;
    item.rows = first.own;
    item.head = first.head;
    item.pattern = first.pattern;
    item.first = Narrow(static_cast<int64_t>(list.tiles.size()));
    int64_t cost = 0;
    for (; i < records.size() && records[i].pattern == first.pattern &&
           records[i].head == first.head &&
           records[i].own.position == first.own.position;
         ++i) {
      LC_CHECK_EQ(records[i].own.count, first.own.count)
          << "one tile of rows splits the same way against every span";
      LC_CHECK_GT(records[i].other.count, 0) << "a tile of no rows";
      list.tiles.push_back(records[i].other);
      cost += Cost(first.own, records[i].other, p.plan.causal, kind);
    }
    item.last = Narrow(static_cast<int64_t>(list.tiles.size()));
    // The tensor-core kernels load an item's first key or query chunk
    // before checking for one (attention_cuda.cu, ChunkCursor): an item has
    // rows and at least one tile.
    LC_CHECK_GT(item.rows.count, 0) << "an item of no rows";
    LC_CHECK_LT(item.first, item.last) << "an item without tiles";
    list.items.push_back(item);
    costs.push_back(cost);
  }

  // Group by pattern (already sorted by it), costliest items first within a
  // pattern so that the long blocks start early.
  list.pattern_begin.assign(p.max_patterns + 1, 0);
  for (const CudaWorkItem& item : list.items) {
    ++list.pattern_begin[item.pattern + 1];
  }
  for (int64_t i = 0; i < p.max_patterns; ++i) {
    list.pattern_begin[i + 1] += list.pattern_begin[i];
  }
  std::vector<size_t> order(list.items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto costlier = [&](size_t x, size_t y) { return costs[x] > costs[y]; };
  bool reordered = false;
  for (int64_t i = 0; i < p.max_patterns; ++i) {
    const auto begin = order.begin() + list.pattern_begin[i];
    const auto end = order.begin() + list.pattern_begin[i + 1];
    if (std::is_sorted(begin, end, costlier)) continue;
    std::stable_sort(begin, end, costlier);
    reordered = true;
  }
  if (reordered) {
    std::vector<CudaWorkItem> sorted;
    sorted.reserve(order.size());
    for (size_t i : order) sorted.push_back(list.items[i]);
    list.items = std::move(sorted);
  }
  return list;
}

namespace {

std::vector<int64_t> EntryKey(const TokenLayout& ql, const TokenLayout& kl) {
  std::vector<int64_t> key;
  AppendLayoutKey(ql, &key);
  AppendLayoutKey(kl, &key);
  return key;
}

}  // namespace

void CudaWorkLists::Prepare(const AttentionProblem& p, const TokenLayout& ql,
                            const TokenLayout& kl) {
  for (CudaWorkKind kind :
       {CudaWorkKind::kQueryItems, CudaWorkKind::kKeyItems}) {
    std::vector<int64_t> key = EntryKey(ql, kl);
    key.push_back(static_cast<int64_t>(kind));
    std::lock_guard<std::mutex> lock(mu_);
    std::unique_ptr<Entry>& entry = entries_[key];
    if (entry != nullptr) continue;
    const CudaWorkListHost host = BuildCudaWorkList(p, ql, kl, kind);
    const int64_t item_bytes = host.items.size() * sizeof(CudaWorkItem);
    const int64_t tile_bytes = host.tiles.size() * sizeof(CudaTileRows);
    auto fresh = std::make_unique<Entry>();
    fresh->buffer = Empty({std::max<int64_t>(1, item_bytes + tile_bytes)},
                          DType::kUInt8, p.device);
    uint8_t* base = static_cast<uint8_t*>(fresh->buffer.raw_data());
    if (item_bytes > 0) {
      CopyBytes(base, p.device, host.items.data(), Device::Cpu(), item_bytes);
    }
    if (tile_bytes > 0) {
      CopyBytes(base + item_bytes, p.device, host.tiles.data(), Device::Cpu(),
                tile_bytes);
    }
    fresh->list.items = reinterpret_cast<const CudaWorkItem*>(base);
    fresh->list.tiles =
        reinterpret_cast<const CudaTileRows*>(base + item_bytes);
    fresh->list.pattern_begin = host.pattern_begin;
    entry = std::move(fresh);
  }
}

const CudaWorkList& CudaWorkLists::Get(const TokenLayout& ql,
                                       const TokenLayout& kl,
                                       CudaWorkKind kind) const {
  std::vector<int64_t> key = EntryKey(ql, kl);
  key.push_back(static_cast<int64_t>(kind));
  std::lock_guard<std::mutex> lock(mu_);
  const auto found = entries_.find(key);
  LC_CHECK(found != entries_.end())
      << "CUDA work lists of layouts the plan did not prepare (" << ql.rows
      << " query rows, " << kl.rows << " key rows)";
  return found->second->list;
}

}  // namespace lc
