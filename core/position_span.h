// PositionSpan: a run [begin, end) of token positions of a sequence - what a
// rank holds (distributed/sequence_parallel.h), what a tile plan restricts
// queries and keys to (attention/tile_plan.h), what a ring chunk's receivers
// use (attention/ring_plan.h). The one type for a run of consecutive
// positions; strided runs stored in a buffer are attention's LocalSpan.
#ifndef LONGCTX_CORE_POSITION_SPAN_H_
#define LONGCTX_CORE_POSITION_SPAN_H_

#include <cstdint>

namespace lc {

// Token positions [begin, end) of a sequence.
struct PositionSpan {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

}  // namespace lc

#endif  // LONGCTX_CORE_POSITION_SPAN_H_
