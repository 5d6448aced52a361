#include "attention/tile_plan.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lc {
namespace {

// Splits the run (position, step, count) into tiles of at most max_rows
// rows, and, with a block size, at every block boundary.
std::vector<TileRows> Split(int64_t position, int64_t step, int64_t count,
                            int64_t max_rows, int64_t block_size) {
  std::vector<TileRows> tiles;
  int64_t i = 0;
  while (i < count) {
    const int64_t p = position + i * step;
    int64_t rows = std::min(max_rows, count - i);
    if (block_size > 0) {
      const int64_t block_end = (p / block_size + 1) * block_size;
      rows = std::min(rows, (block_end - p + step - 1) / step);
    }
    tiles.push_back(TileRows{p, step, rows});
    i += rows;
  }
  return tiles;
}

// The selected positions of a segment [seg_begin, seg_end) under pattern
// (r, o) that fall in `range`, as (first position, count).
void SelectedRun(int64_t seg_begin, int64_t seg_end, const DilatedPattern& p,
                 PositionSpan range, int64_t* first, int64_t* count) {
  *count = 0;
  const int64_t start = seg_begin + p.offset;
  const int64_t lo = std::max(start, range.begin);
  const int64_t hi = std::min(seg_end, range.end);
  if (lo >= hi) return;
  const int64_t r = p.dilation_rate;
  const int64_t j_lo = (lo - start + r - 1) / r;
  const int64_t j_hi = (hi - start + r - 1) / r;
  *first = start + j_lo * r;
  *count = std::max<int64_t>(0, j_hi - j_lo);
}

}  // namespace

absl::StatusOr<TileOrder> ParseTileOrder(const std::string& name) {
  if (name == "row_major") return TileOrder::kRowMajor;
  if (name == "hilbert") return TileOrder::kHilbert;
  return absl::InvalidArgumentError(absl::StrCat(
      "tile order \"", name, "\" (expected row_major or hilbert)"));
}

void HilbertCell(int64_t side, int64_t d, int64_t* x, int64_t* y) {
  int64_t rx, ry, t = d;
  *x = *y = 0;
  for (int64_t s = 1; s < side; s *= 2) {
    rx = 1 & (t / 2);
    ry = 1 & (t ^ rx);
    if (ry == 0) {  // rotate the quadrant
      if (rx == 1) {
        *x = s - 1 - *x;
        *y = s - 1 - *y;
      }
      std::swap(*x, *y);
    }
    *x += s * rx;
    *y += s * ry;
    t /= 4;
  }
}

bool WindowMeets(const TilePlanOptions& options, int64_t q_first,
                 int64_t q_last, int64_t k_first, int64_t k_last) {
  // The keys nearest to the window: u >= t - left binds hardest for the
  // last key against the first query, u <= t + right for the first key
  // against the last query.
  if (options.window_left >= 0 && k_last < q_first - options.window_left) {
    return false;
  }
  return options.window_right < 0 || k_first <= q_last + options.window_right;
}

void ForEachTile(const std::vector<DilatedPattern>& patterns, int64_t n,
                 PositionSpan queries, PositionSpan keys,
                 const TilePlanOptions& options,
                 const std::function<void(const Tile&)>& fn) {
  const int64_t block_size =
      options.block_mask != nullptr ? options.block_mask->block_size() : 0;
  for (size_t pi = 0; pi < patterns.size(); ++pi) {
    const DilatedPattern& pattern = patterns[pi];
    const int64_t w = pattern.segment_length;
    // Segments holding both queries and keys (the two ranges may be apart:
    // a ring rank's queries against another rank's keys).
    const int64_t q_end = std::min(queries.end, n),
                  k_end = std::min(keys.end, n);
    if (queries.begin >= q_end || keys.begin >= k_end) continue;
    const int64_t first = std::max(queries.begin, keys.begin) / w;
    const int64_t last = std::min(q_end - 1, k_end - 1) / w;
    for (int64_t s = first; s <= last; ++s) {
      const int64_t seg_begin = s * w, seg_end = std::min(seg_begin + w, n);
      int64_t q_first, q_count, k_first, k_count;
      SelectedRun(seg_begin, seg_end, pattern, queries, &q_first, &q_count);
      SelectedRun(seg_begin, seg_end, pattern, keys, &k_first, &k_count);
      if (q_count == 0 || k_count == 0) continue;
      const int64_t r = pattern.dilation_rate;
      const std::vector<TileRows> q_tiles =
          Split(q_first, r, q_count, options.query_tile, block_size);
      const std::vector<TileRows> k_tiles =
          Split(k_first, r, k_count, options.key_tile, block_size);
      // Visits a tile whose block pair is on (or that has no mask).
      auto visit_on = [&](size_t qi, size_t ki) {
        const TileRows& q = q_tiles[qi];
        const TileRows& k = k_tiles[ki];
        if (options.causal && k.position > q.last()) return;
        if (!WindowMeets(options, q.position, q.last(), k.position, k.last())) {
          return;
        }
        fn(Tile{q, k, static_cast<int>(pi)});
      };
      auto visit = [&](size_t qi, size_t ki) {
        if (block_size > 0 &&
            !options.block_mask->on(q_tiles[qi].position / block_size,
                                    k_tiles[ki].position / block_size)) {
          return;
        }
        visit_on(qi, ki);
      };
      const int64_t nq = q_tiles.size(), nk = k_tiles.size();
      if (options.order == TileOrder::kRowMajor && block_size > 0) {
        // The key tiles of one block are consecutive (tiles never straddle
        // blocks): walking the query block's row of on key blocks replaces
        // a visit per key tile, which made plans of long block-sparse
        // sequences quadratic in tiles.
        const int64_t first_block = k_tiles.front().position / block_size;
        const int64_t blocks =
            k_tiles.back().position / block_size - first_block + 1;
        std::vector<int64_t> begin(blocks, -1), end(blocks, -1);
        for (int64_t ki = 0; ki < nk; ++ki) {
          const int64_t b = k_tiles[ki].position / block_size - first_block;
          if (begin[b] < 0) begin[b] = ki;
          end[b] = ki + 1;
        }
        for (int64_t qi = 0; qi < nq; ++qi) {
          const absl::Span<const int32_t> row =
              options.block_mask->Row(q_tiles[qi].position / block_size);
          for (auto it = std::lower_bound(row.begin(), row.end(), first_block);
               it != row.end() && *it < first_block + blocks; ++it) {
            const int64_t b = *it - first_block;
            for (int64_t ki = begin[b]; ki >= 0 && ki < end[b]; ++ki) {
              visit_on(qi, ki);
            }
          }
        }
      } else if (options.order == TileOrder::kRowMajor) {
        for (int64_t qi = 0; qi < nq; ++qi) {
          for (int64_t ki = 0; ki < nk; ++ki) visit(qi, ki);
        }
      } else {
        int64_t side = 1;
        while (side < std::max(nq, nk)) side *= 2;
        for (int64_t d = 0; d < side * side; ++d) {
          int64_t x, y;
          HilbertCell(side, d, &x, &y);
          if (x < nq && y < nk) visit(x, y);
        }
      }
    }
  }
}

}  // namespace lc
