// The tiles an attention kernel visits for one head: for each pattern and
// segment, the selected query and key positions (strided runs) cut into
// tiles, skipping (query tile, key tile) pairs with no allowed pair (all keys
// in the causal future or outside the window, or a block pair that is off),
// visited row-major or
// along a Hilbert curve. Position windows restrict queries and keys to the
// tokens a rank holds, so ring attention plans with the same code.
#ifndef LONGCTX_ATTENTION_TILE_PLAN_H_
#define LONGCTX_ATTENTION_TILE_PLAN_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention/pattern.h"
#include "core/position_span.h"

namespace lc {

enum class TileOrder { kRowMajor, kHilbert };

// Parses "row_major" / "hilbert".
absl::StatusOr<TileOrder> ParseTileOrder(const std::string& name);

// Positions position, position + step, ... (count of them).
struct TileRows {
  int64_t position = 0;
  int64_t step = 1;
  int64_t count = 0;
  int64_t last() const { return position + (count - 1) * step; }
};

struct Tile {
  TileRows q;
  TileRows k;
  int pattern = 0;  // index into the head's patterns
};

struct TilePlanOptions {
  bool causal = false;
  // Keys u with t - window_left <= u <= t + window_right only (-1:
  // unlimited); tiles wholly outside are skipped.
  int64_t window_left = -1;
  int64_t window_right = -1;
  const BlockMask* block_mask = nullptr;  // tiles then hold one block each
  int64_t query_tile = 128;               // rows per query tile at most
  int64_t key_tile = 256;                 // rows per key tile at most
  TileOrder order = TileOrder::kRowMajor;
};

// Whether the window of `options` lets some query in positions [q_first,
// q_last] attend some key in [k_first, k_last] (a conservative test for
// strided rows).
bool WindowMeets(const TilePlanOptions& options, int64_t q_first,
                 int64_t q_last, int64_t k_first, int64_t k_last);

// Calls fn for each tile of one head with patterns `patterns` over a
// sequence of n tokens, queries in `queries` and keys in `keys`.
void ForEachTile(const std::vector<DilatedPattern>& patterns, int64_t n,
                 PositionSpan queries, PositionSpan keys,
                 const TilePlanOptions& options,
                 const std::function<void(const Tile&)>& fn);

// Maps distance d along a Hilbert curve over a side x side grid (side a
// power of two) to the cell (x, y).
void HilbertCell(int64_t side, int64_t d, int64_t* x, int64_t* y);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_TILE_PLAN_H_
