// The CUDA kernels of the partial-attention primitive, as the attention
// drivers (attention_kernel.h) launch them: the fused forward (online
// softmax, merged into float32 accumulators with the overflow-safe merge),
// the backward by recomputation (one kernel over query work items for dQ,
// one over key work items for dK and dV, so no atomics and bit-identical
// results for equal inputs) and the row delta. Queries and keys are strided
// runs of rows of [batch, rows, heads, head_dim] device buffers (dilation is
// a stride, never a gather copy); the work items come from the same tile plan
// as the CPU path (attention_cuda_plan.h). bfloat16 with head_dim 64 or 128
// runs on tensor cores (mma.sync, float32 accumulation); float32, float64 and
// bfloat16 of other head dims (up to 256) run on a plain FMA kernel with the
// same work lists and masks. Plain C++: includable by g++.
#ifndef LONGCTX_ATTENTION_ATTENTION_CUDA_H_
#define LONGCTX_ATTENTION_ATTENTION_CUDA_H_

#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace lc {

// Rows of one side of a tile in a local buffer: local rows row, row +
// row_step, ... (count of them) hold global positions position, position +
// position_step, ... (the steps differ for buffers that store only one
// dilated pattern's rows).
struct CudaTileRows {
  int32_t row = 0;
  int32_t position = 0;
  int32_t row_step = 1;
  int32_t position_step = 1;
  int32_t count = 0;
};

// The work of one thread block: `rows` of head `head` under pattern
// `pattern` (an index into the head's patterns), against the other side's
// tiles [first, last) of the work list (in increasing position order).
struct CudaWorkItem {
  CudaTileRows rows;
  int32_t head = 0;
  int32_t pattern = 0;
  int32_t first = 0;
  int32_t last = 0;
};

// One kind of work list on the device: query items (query tiles of
// kCudaQueryTileRows rows, each with the key tiles it meets) or key items
// (key tiles of kCudaKeyTileRows rows, each with the query tiles it meets).
// Items are grouped by pattern index: those of pattern i are
// items[pattern_begin[i], pattern_begin[i + 1]), so one launch per pattern
// index touches each output row at most once.
struct CudaWorkList {
  const CudaWorkItem* items = nullptr;  // device memory
  const CudaTileRows* tiles = nullptr;  // device memory
  std::vector<int64_t> pattern_begin;   // host, patterns + 1 entries
};

// Rows per query item and per key item: the tile sizes of the kernels.
constexpr int64_t kCudaQueryTileRows = 128;
constexpr int64_t kCudaKeyTileRows = 128;
// The largest head_dim the CUDA kernels take.
constexpr int64_t kCudaMaxHeadDim = 256;

// Geometry and options of one launch. q, grad_out (and out, dq): [batch,
// q_rows, heads, head_dim]; k, v (and dk, dv): [batch, k_rows, heads,
// head_dim], or packed per head as [batch, k_rows, head_dim] (ring attention's
// key chunks: the tiles' rows then count from the head's first row); all of
// `dtype` on CUDA device `device`, rows 16-byte aligned for the tensor-core
// kernels. Row statistics (lse, delta, grad_lse, [batch, heads, q_rows]) are
// float64 for float64 inputs and float32 otherwise.
struct CudaAttentionArgs {
  DType dtype = DType::kFloat32;
  // The dtype of out (forward) or of dq, dk, dv (backward): the accumulator
  // dtype (float64 for float64 inputs, else float32), merged or added into;
  // or, for bfloat16 inputs with max_patterns == 1, bfloat16: each row is
  // then written by one thread block (rows no item touches keep their
  // values), so the call must be the only one contributing to the buffer.
  DType out_dtype = DType::kFloat32;
  int device = 0;
  int64_t batch = 0, n = 0, heads = 0, head_dim = 0;
  int64_t q_rows = 0;
  // Element strides: row r of head h of batch b starts at b * batch_stride
  // + r * row_stride + h * head_stride (query side: head_stride = head_dim).
  int64_t q_batch_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t max_patterns = 1;  // in the dropout stream (b, h, pattern)
  double scale = 1;
  bool causal = false;
  const uint8_t* key_padding = nullptr;  // device uint8 [batch, n], or null
  // Pair (t, u) of stream s = (b * heads + h) * max_patterns + pattern keeps
  // its probability when AttentionDropoutUniform(seed, offset, s, n, t, u) >=
  // dropout (core/philox.h), scaled by 1 / (1 - dropout): the CPU
  // primitive's draw.
  double dropout = 0;
  uint64_t dropout_seed = 0, dropout_offset = 0;
};

// Merges attention of the queries of `query_items` over their keys into
// out_acc ([batch, q_rows, heads, head_dim], of out_dtype) and lse_acc
// ([batch, heads, q_rows]); rows no item touches are left as they are.
void LaunchAttentionForward(const CudaAttentionArgs& args,
                            const CudaWorkList& query_items, const void* q,
                            const void* k, const void* v, void* out_acc,
                            void* lse_acc);

// Adds the gradients of the pairs of the work lists into dq_acc (like q) and
// dk_acc, dv_acc (like k), all of out_dtype. lse, delta and grad_lse are
// [batch, heads, q_rows] (lse the final one of the whole call; grad_lse the
// gradient of lse).
void LaunchAttentionBackward(const CudaAttentionArgs& args,
                             const CudaWorkList& query_items,
                             const CudaWorkList& key_items, const void* q,
                             const void* k, const void* v, const void* grad_out,
                             const void* lse, const void* delta,
                             const void* grad_lse, void* dq_acc, void* dk_acc,
                             void* dv_acc);

// The tensor-core kernels bfloat16 attention (head_dim 64 or 128) runs on:
// kMmaSync, the mma.sync kernels, on every GPU; kWgmma, Hopper's wgmma
// kernels on compute capability 9.0 devices (mma.sync elsewhere). The
// default is kMmaSync: the wgmma kernels have not yet run on a GPU (no
// device could be started in the session that wrote them), so they are
// opt-in until the GPU suite, which runs both families, has passed on them.
// Process-wide; set it between calls, not during one.
enum class CudaTensorCoreKernels { kMmaSync, kWgmma };
void SetCudaTensorCoreKernels(CudaTensorCoreKernels kernels);
CudaTensorCoreKernels GetCudaTensorCoreKernels();

// delta[b, h, t] = sum_c out[b, t, h, c] * grad_out[b, t, h, c] for out and
// grad_out of `dtype` ([batch, rows, heads, head_dim], contiguous) and delta
// in the accumulator dtype.
void LaunchRowDelta(DType dtype, int device, int64_t batch, int64_t rows,
                    int64_t heads, int64_t head_dim, const void* out,
                    const void* grad_out, void* delta);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_CUDA_H_
