// The work lists of the CUDA attention kernels (attention_cuda.h), built
// from the same tile plan as the CPU drivers (ForEachTile over every head
// and every pair of local spans), so the GPU visits exactly the tiles the CPU
// visits under the same masks, and kept on the device for the calls that
// reuse them (a call's backward, a ring step's backward). Internal to
// attention/.
#ifndef LONGCTX_ATTENTION_ATTENTION_CUDA_PLAN_H_
#define LONGCTX_ATTENTION_ATTENTION_CUDA_PLAN_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "attention/attention_cuda.h"
#include "attention/attention_kernel.h"
#include "core/device.h"
#include "core/tensor.h"

namespace lc {

enum class CudaWorkKind {
  kQueryItems,  // query tiles of kCudaQueryTileRows, with their key tiles
  kKeyItems,    // key tiles of kCudaKeyTileRows, with their query tiles
};

// A work list in host memory: items grouped by pattern index
// (pattern_begin has max_patterns + 1 entries), within a pattern the
// costliest first; each item's tiles in increasing position order.
struct CudaWorkListHost {
  std::vector<CudaWorkItem> items;
  std::vector<CudaTileRows> tiles;
  std::vector<int64_t> pattern_begin;
};

// The work list of `kind` for the queries of ql against the keys of kl.
// Query items group the tiles of one (head, pattern, query tile) over every
// key span (in a zigzag ring layout one query tile meets keys of two spans);
// key items likewise per key tile.
CudaWorkListHost BuildCudaWorkList(const AttentionProblem& p,
                                   const TokenLayout& ql, const TokenLayout& kl,
                                   CudaWorkKind kind);

// BuildCudaWorkList through a process-wide cache of the most recent lists
// (keyed by everything a list depends on: heads' patterns, n, causality, the
// block mask, layouts and kind), so that repeated calls of one geometry
// (layers, training steps, ring steps) skip the host planning; the upload to
// the device (CudaPlanCache) is still made per call. Thread-safe.
std::shared_ptr<const CudaWorkListHost> CachedCudaWorkList(
    const AttentionProblem& p, const TokenLayout& ql, const TokenLayout& kl,
    CudaWorkKind kind);

// Work lists on the device, built and uploaded on first use for each
// (kind, query layout, key layout, device) and kept while the cache lives
// (the problem holds it: forward and backward of a call share the lists).
// Thread-safe.
class CudaPlanCache {
 public:
  const CudaWorkList& Get(const AttentionProblem& p, const TokenLayout& ql,
                          const TokenLayout& kl, CudaWorkKind kind,
                          Device device);

 private:
  struct Entry {
    Tensor buffer;  // uint8 on the device: items, then tiles
    CudaWorkList list;
  };
  std::mutex mu_;
  std::map<std::vector<int64_t>, std::unique_ptr<Entry>> entries_;
};

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_CUDA_PLAN_H_
