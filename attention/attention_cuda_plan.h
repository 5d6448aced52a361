// The work lists of the CUDA attention kernels (attention_cuda.h), built
// from the same tile plan as the CPU drivers (ForEachTile over every head
// and every pair of local spans), so the GPU visits exactly the tiles the CPU
// visits under the same masks, and kept on the device for every call of the
// plan that built them. Internal to attention/.
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

// NOTE [ Work lists per plan ]
// The device work lists of one problem (AttentionProblem::cuda_work_lists):
// the plan prepares every pair of layouts its calls use when it is made
// (one rank: all tokens against all; the ring: this rank's queries against
// each step's chunk layout), building the lists on the host and uploading
// them with host waits once; a call only looks them up, so the steady state
// plans and uploads nothing. Thread-safe.
class CudaWorkLists {
 public:
  // Builds and uploads the query and key lists of ql x kl on p's device,
  // unless they are there already.
  void Prepare(const AttentionProblem& p, const TokenLayout& ql,
               const TokenLayout& kl);

  // The list of `kind` that Prepare made for ql x kl (a pair never
  // prepared is an internal error).
  const CudaWorkList& Get(const TokenLayout& ql, const TokenLayout& kl,
                          CudaWorkKind kind) const;

 private:
  struct Entry {
    Tensor buffer;  // uint8 on the device: items, then tiles
    CudaWorkList list;
  };
  mutable std::mutex mu_;
  std::map<std::vector<int64_t>, std::unique_ptr<Entry>> entries_;
};

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_CUDA_PLAN_H_
