#include "attention/cudnn_sdpa.h"

#include <cudnn.h>

#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda.h"
#include "core/status.h"
#include "core/tensor.h"

namespace lc {
namespace {

// Unless `status` is success, throws lc::Error naming the cuDNN call, its
// status and cuDNN's last error message; `unimplemented` marks calls whose
// failure means "no engine for this graph" rather than a broken launch.
void CheckCudnn(cudnnStatus_t status, const char* expr, bool unimplemented,
                const char* file, int line) {
  if (status == CUDNN_STATUS_SUCCESS) return;
  char last[1024] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  std::string message = absl::StrCat("cuDNN: ", expr, " failed with ",
                                     cudnnGetErrorString(status), " at ", file,
                                     ":", line, last[0] ? ": " : "", last);
  throw Error(unimplemented ? absl::UnimplementedError(message)
                            : absl::InternalError(message));
}

// A launch: a failure is an Internal error.
#define LC_CUDNN_CHECK(expr) \
  CheckCudnn((expr), #expr, false, __FILE__, __LINE__)
// Building a graph: a failure means cuDNN does not support it.
#define LC_CUDNN_BUILD(expr) CheckCudnn((expr), #expr, true, __FILE__, __LINE__)

// An owned backend descriptor.
class Descriptor {
 public:
  explicit Descriptor(cudnnBackendDescriptorType_t type) {
    LC_CUDNN_BUILD(cudnnBackendCreateDescriptor(type, &desc_));
  }
  ~Descriptor() { cudnnBackendDestroyDescriptor(desc_); }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;

  cudnnBackendDescriptor_t get() const { return desc_; }

  Descriptor& Set(cudnnBackendAttributeName_t name,
                  cudnnBackendAttributeType_t type, int64_t count,
                  const void* values) {
    LC_CUDNN_BUILD(cudnnBackendSetAttribute(desc_, name, type, count, values));
    return *this;
  }
  Descriptor& SetInt64(cudnnBackendAttributeName_t name, int64_t value) {
    return Set(name, CUDNN_TYPE_INT64, 1, &value);
  }
  Descriptor& SetInt64s(cudnnBackendAttributeName_t name,
                        const std::vector<int64_t>& values) {
    return Set(name, CUDNN_TYPE_INT64, static_cast<int64_t>(values.size()),
               values.data());
  }
  Descriptor& SetType(cudnnBackendAttributeName_t name, cudnnDataType_t type) {
    return Set(name, CUDNN_TYPE_DATA_TYPE, 1, &type);
  }
  Descriptor& SetBool(cudnnBackendAttributeName_t name, bool value) {
    return Set(name, CUDNN_TYPE_BOOLEAN, 1, &value);
  }
  Descriptor& SetDesc(cudnnBackendAttributeName_t name, const Descriptor& d) {
    cudnnBackendDescriptor_t raw = d.get();
    return Set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
  }
  void Finalize() { LC_CUDNN_BUILD(cudnnBackendFinalize(desc_)); }

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
};

// Unique ids of the tensors a caller binds; virtual tensors count from 100.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kScale,
  kGradO,
  kGradQ,
  kGradK,
  kGradV,
  kNegInf,
  kOne,
  kRowSum,    // backward: rowsum(grad_out * out), in the workspace
  kGradQAcc,  // backward: float32 dq, in the workspace
};

using Dims = std::vector<int64_t>;

// Packed strides of dims.
Dims PackedStrides(const Dims& dims) {
  Dims strides(dims.size(), 1);
  for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) {
    strides[i] = strides[i + 1] * dims[i + 1];
  }
  return strides;
}

// One operation graph under construction; owns every descriptor it made
// (the finalized plan refers to them).
class GraphBuilder {
 public:
  // A tensor the caller binds (or, with is_virtual, one that lives only
  // inside the fused kernel).
  const Descriptor& Tensor(int64_t uid, cudnnDataType_t type, const Dims& dims,
                           const Dims& strides, bool is_virtual = false,
                           bool by_value = false) {
    Descriptor& t = Make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t.SetType(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
        .SetInt64s(CUDNN_ATTR_TENSOR_DIMENSIONS, dims)
        .SetInt64s(CUDNN_ATTR_TENSOR_STRIDES, strides)
        .SetInt64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
        .SetInt64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16);
    if (is_virtual) t.SetBool(CUDNN_ATTR_TENSOR_IS_VIRTUAL, true);
    if (by_value) t.SetBool(CUDNN_ATTR_TENSOR_IS_BY_VALUE, true);
    t.Finalize();
    return t;
  }
  // A float32 (or `type`) intermediate with packed strides.
  const Descriptor& Virtual(const Dims& dims,
                            cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    return Tensor(NextUid(), type, dims, PackedStrides(dims), true);
  }
  int64_t NextUid() { return next_virtual_++; }
  // A by-value float32 scalar (bound to a host float).
  const Descriptor& Scalar(int64_t uid) {
    return Tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false,
                  true);
  }

  // y = mode(x, b) (b, t optional: t is BINARY_SELECT's condition).
  void Pointwise(cudnnPointwiseMode_t mode, const Descriptor& x,
                 const Descriptor* b, const Descriptor& y,
                 const Descriptor* t = nullptr, int64_t axis = -1,
                 cudnnDataType_t math = CUDNN_DATA_FLOAT) {
    Descriptor& pw = Make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.Set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
        .SetType(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
    if (axis >= 0) pw.SetInt64(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw.Finalize();
    const float one = 1;
    Descriptor& op = Make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)
        .SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x)
        .SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y)
        .Set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one)
        .Set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
    if (b != nullptr) op.SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t != nullptr) op.SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    Add(op);
  }
  // c = a b (batched over the leading dims), float32 accumulation.
  void Matmul(const Descriptor& a, const Descriptor& b, const Descriptor& c) {
    const double padding = 0;
    Descriptor& mm = Make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm.SetType(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT)
        .Set(CUDNN_ATTR_MATMUL_PADDING_VALUE, CUDNN_TYPE_DOUBLE, 1, &padding)
        .Finalize();
    Descriptor& op = Make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.SetDesc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
    Add(op);
  }
  // y = reduce(x) over the dims where y has size 1.
  void Reduce(cudnnReduceTensorOp_t reduce, const Descriptor& x,
              const Descriptor& y) {
    Descriptor& rd = Make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    rd.Set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1,
           &reduce)
        .SetType(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .SetBool(CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, false)
        .Finalize();
    Descriptor& op = Make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.SetDesc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .SetDesc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .SetDesc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd);
    Add(op);
  }
  // y = x in another layout (a transpose, as y's dims and strides say).
  void Reshape(const Descriptor& x, const Descriptor& y) {
    Descriptor& op = Make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.SetDesc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x)
        .SetDesc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    Add(op);
  }

  // cuDNN's single fused forward operation: out and stats of q, k, v.
  void Sdpa(const Descriptor& q, const Descriptor& k, const Descriptor& v,
            const Descriptor& out, const Descriptor& stats,
            const Descriptor& scale) {
    Descriptor& op = Make(CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR);
    op.SetDesc(CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, q)
        .SetDesc(CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, k)
        .SetDesc(CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, v)
        .SetDesc(CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, out)
        .SetDesc(CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC, stats)
        .SetDesc(CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, scale);
    Add(op);
  }

  // The causal mask on scores s ([b, h, s, s] float32): keys after the
  // query get -inf.
  const Descriptor& CausalMask(const Descriptor& s, const Dims& score_dims) {
    const Descriptor& row = Virtual(score_dims, CUDNN_DATA_INT32);
    Pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, row, nullptr, 2);
    const Descriptor& col = Virtual(score_dims, CUDNN_DATA_INT32);
    Pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, col, nullptr, 3);
    const Descriptor& keep = Virtual(score_dims, CUDNN_DATA_BOOLEAN);
    Pointwise(CUDNN_POINTWISE_CMP_GE, row, &col, keep, nullptr, -1,
              CUDNN_DATA_BOOLEAN);
    const Descriptor& masked = Virtual(score_dims);
    Pointwise(CUDNN_POINTWISE_BINARY_SELECT, s, &Scalar(kNegInf), masked,
              &keep);
    return masked;
  }

  std::vector<std::unique_ptr<Descriptor>>& owned() { return owned_; }
  const std::vector<cudnnBackendDescriptor_t>& ops() const { return ops_; }

 private:
  Descriptor& Make(cudnnBackendDescriptorType_t type) {
    owned_.push_back(std::make_unique<Descriptor>(type));
    return *owned_.back();
  }
  void Add(Descriptor& op) {
    op.Finalize();
    ops_.push_back(op.get());
  }

  std::vector<std::unique_ptr<Descriptor>> owned_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  int64_t next_virtual_ = 100;
};

// A finalized execution plan and everything it refers to.
struct Plan {
  std::vector<std::unique_ptr<Descriptor>> descriptors;
  cudnnBackendDescriptor_t plan = nullptr;
  int64_t engine_bytes = 0;  // the engine's workspace
  // Tensors of the graph that live in the workspace (uid, bytes), placed
  // before the engine's part, each 256-byte aligned.
  std::vector<std::pair<int64_t, int64_t>> scratch;
};

// cuDNN's heuristics' first engine configuration that finalizes into a plan.
void FinalizePlan(cudnnHandle_t handle, GraphBuilder& graph, Plan& plan) {
  auto owned = [&](cudnnBackendDescriptorType_t type) -> Descriptor& {
    graph.owned().push_back(std::make_unique<Descriptor>(type));
    return *graph.owned().back();
  };
  Descriptor& op_graph = owned(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  op_graph.Set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
      .Set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
           static_cast<int64_t>(graph.ops().size()), graph.ops().data())
      .Finalize();
  std::string failures;
  for (cudnnBackendHeurMode_t mode :
       {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    Descriptor& heur = owned(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    heur.SetDesc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, op_graph)
        .Set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode)
        .Finalize();
    int64_t count = 0;
    LC_CUDNN_BUILD(cudnnBackendGetAttribute(
        heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
        CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
    std::vector<cudnnBackendDescriptor_t> raw;  // unfinalized configs
    for (int64_t i = 0; i < count; ++i) {
      raw.push_back(owned(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR).get());
    }
    int64_t returned = 0;
    if (count > 0) {
      LC_CUDNN_BUILD(cudnnBackendGetAttribute(
          heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
          CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned, raw.data()));
    }
    for (int64_t i = 0; i < returned; ++i) {
      Descriptor& candidate = owned(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      const cudnnStatus_t set = cudnnBackendSetAttribute(
          candidate.get(), CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE,
          1, &handle);
      const cudnnStatus_t cfg = cudnnBackendSetAttribute(
          candidate.get(), CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
          CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw[i]);
      const cudnnStatus_t fin =
          set == CUDNN_STATUS_SUCCESS && cfg == CUDNN_STATUS_SUCCESS
              ? cudnnBackendFinalize(candidate.get())
              : CUDNN_STATUS_BAD_PARAM;
      if (fin != CUDNN_STATUS_SUCCESS) {
        char last[512] = {0};
        cudnnGetLastErrorString(last, sizeof(last));
        absl::StrAppend(&failures, " [config ", i, ": ",
                        cudnnGetErrorString(fin), " ", last, "]");
        continue;
      }
      int64_t n = 0;
      LC_CUDNN_BUILD(cudnnBackendGetAttribute(
          candidate.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
          CUDNN_TYPE_INT64, 1, &n, &plan.engine_bytes));
      plan.plan = candidate.get();
      plan.descriptors = std::move(graph.owned());
      return;
    }
    absl::StrAppend(&failures, " [heuristics mode ", static_cast<int>(mode),
                    ": ", returned, " configs]");
  }
  throw Error(absl::UnimplementedError(
      absl::StrCat("cuDNN: no engine runs this attention graph:", failures)));
}

// [b, h, s, d] with the shape's strides; transposed: [b, h, d, s].
Dims ViewDims(const CudnnSdpaShape& x, bool transposed = false) {
  return transposed ? Dims{x.b, x.h, x.d, x.s} : Dims{x.b, x.h, x.s, x.d};
}
Dims ViewStrides(const CudnnSdpaShape& x, bool transposed = false) {
  return transposed ? Dims{x.strides[0], x.strides[1], 1, x.strides[2]}
                    : Dims{x.strides[0], x.strides[1], x.strides[2], 1};
}

// The forward graph. Without a mask cuDNN 9.19 offers one fused SDPA
// operation (what cudnn-frontend picks there); with the causal mask, or where
// that has no engine, the composite graph cuDNN matches to its flash
// kernel: s = scale q k^T (masked), stats = logsumexp(s), out = softmax(s) v.
std::unique_ptr<Plan> BuildForward(cudnnHandle_t handle,
                                   const CudnnSdpaShape& x) {
  const Dims scores{x.b, x.h, x.s, x.s}, rows{x.b, x.h, x.s, 1};
  auto view = [&](GraphBuilder& g, int64_t uid,
                  bool transposed = false) -> const Descriptor& {
    return g.Tensor(uid, CUDNN_DATA_BFLOAT16, ViewDims(x, transposed),
                    ViewStrides(x, transposed));
  };
  auto plan = std::make_unique<Plan>();
  if (!x.causal) {
    GraphBuilder g;
    g.Sdpa(view(g, kQ), view(g, kK), view(g, kV), view(g, kO),
           g.Tensor(kStats, CUDNN_DATA_FLOAT, rows, PackedStrides(rows)),
           g.Scalar(kScale));
    const absl::Status fused =
        StatusFromCall([&] { FinalizePlan(handle, g, *plan); });
    if (fused.ok()) return plan;
    if (!absl::IsUnimplemented(fused)) ThrowIfError(fused);
  }
  GraphBuilder g;
  const Descriptor& q = view(g, kQ);
  const Descriptor& kt = view(g, kK, true);
  const Descriptor& v = view(g, kV);
  const Descriptor& o = view(g, kO);
  const Descriptor& stats =
      g.Tensor(kStats, CUDNN_DATA_FLOAT, rows, PackedStrides(rows));

  const Descriptor& qk = g.Virtual(scores);
  g.Matmul(q, kt, qk);
  const Descriptor* s = &g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_MUL, qk, &g.Scalar(kScale), *s);
  if (x.causal) s = &g.CausalMask(*s, scores);
  const Descriptor& max = g.Virtual(rows);
  g.Reduce(CUDNN_REDUCE_TENSOR_MAX, *s, max);
  const Descriptor& shifted = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_SUB, *s, &max, shifted);
  const Descriptor& e = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_EXP, shifted, nullptr, e);
  const Descriptor& sum = g.Virtual(rows);
  g.Reduce(CUDNN_REDUCE_TENSOR_ADD, e, sum);
  const Descriptor& log_sum = g.Virtual(rows);
  g.Pointwise(CUDNN_POINTWISE_LOG, sum, nullptr, log_sum);
  g.Pointwise(CUDNN_POINTWISE_ADD, max, &log_sum, stats);
  const Descriptor& p = g.Virtual(scores, CUDNN_DATA_BFLOAT16);
  g.Pointwise(CUDNN_POINTWISE_DIV, e, &sum, p);
  g.Matmul(p, v, o);
  FinalizePlan(handle, g, *plan);
  return plan;
}

// The backward graph (cuDNN's flash backward pattern): p = exp(scale q k^T
// - stats) recomputed (masked), dv = p^T do, ds = p (do v^T - rowsum(do *
// out)) scale, dk = ds^T q, dq = ds k through a float32 accumulator.
std::unique_ptr<Plan> BuildBackward(cudnnHandle_t handle,
                                    const CudnnSdpaShape& x) {
  GraphBuilder g;
  const Dims scores{x.b, x.h, x.s, x.s}, rows{x.b, x.h, x.s, 1};
  // [b, h, s, s] transposed in its last two dims.
  const Dims scores_t_strides{x.h * x.s * x.s, x.s * x.s, 1, x.s};
  auto view = [&](int64_t uid, bool transposed = false) -> const Descriptor& {
    return g.Tensor(uid, CUDNN_DATA_BFLOAT16, ViewDims(x, transposed),
                    ViewStrides(x, transposed));
  };
  const Descriptor& q = view(kQ);
  const Descriptor& kt = view(kK, true);
  const Descriptor& vt = view(kV, true);
  const Descriptor& o = view(kO);
  const Descriptor& dout = view(kGradO);
  const Descriptor& stats =
      g.Tensor(kStats, CUDNN_DATA_FLOAT, rows, PackedStrides(rows));
  const Descriptor& dq = view(kGradQ);
  const Descriptor& dk = view(kGradK);
  const Descriptor& dv = view(kGradV);
  const Descriptor& scale = g.Scalar(kScale);

  // rowsum(do * out), stored in the workspace for every tile to read.
  const Descriptor& dout_o = g.Virtual(ViewDims(x));
  g.Pointwise(CUDNN_POINTWISE_MUL, dout, &o, dout_o);
  const Descriptor& row_dot = g.Virtual(rows);
  g.Reduce(CUDNN_REDUCE_TENSOR_ADD, dout_o, row_dot);
  const Descriptor& row_sum =
      g.Tensor(kRowSum, CUDNN_DATA_FLOAT, rows, PackedStrides(rows));
  g.Pointwise(CUDNN_POINTWISE_MUL, row_dot, &g.Scalar(kOne), row_sum);

  // p = exp(scale q k^T - stats), masked.
  const Descriptor& qk = g.Virtual(scores);
  g.Matmul(q, kt, qk);
  const Descriptor& s = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_MUL, qk, &scale, s);
  const Descriptor* shifted = &g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_SUB, s, &stats, *shifted);
  if (x.causal) shifted = &g.CausalMask(*shifted, scores);
  const Descriptor& p = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_EXP, *shifted, nullptr, p);

  // dv = p^T do.
  const Descriptor& p_t = g.Tensor(g.NextUid(), CUDNN_DATA_BFLOAT16, scores,
                                   scores_t_strides, true);
  g.Reshape(p, p_t);
  g.Matmul(p_t, dout, dv);
  // ds = p (do v^T - rowsum) scale.
  const Descriptor& dp = g.Virtual(scores);
  g.Matmul(dout, vt, dp);
  const Descriptor& dp_centered = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_SUB, dp, &row_sum, dp_centered);
  const Descriptor& ds_unscaled = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_MUL, dp_centered, &p, ds_unscaled);
  const Descriptor& ds = g.Virtual(scores);
  g.Pointwise(CUDNN_POINTWISE_MUL, ds_unscaled, &scale, ds);
  // dk = ds^T q.
  const Descriptor& ds_t = g.Tensor(g.NextUid(), CUDNN_DATA_BFLOAT16, scores,
                                    scores_t_strides, true);
  g.Reshape(ds, ds_t);
  g.Matmul(ds_t, q, dk);
  // dq = ds k, accumulated in float32, then converted.
  const Descriptor& k = g.Tensor(g.NextUid(), CUDNN_DATA_FLOAT, ViewDims(x),
                                 ViewStrides(x), true);
  g.Reshape(kt, k);
  const Descriptor& dq_acc = g.Tensor(kGradQAcc, CUDNN_DATA_FLOAT, ViewDims(x),
                                      PackedStrides(ViewDims(x)));
  g.Matmul(ds, k, dq_acc);
  g.Pointwise(CUDNN_POINTWISE_IDENTITY, dq_acc, nullptr, dq);

  auto plan = std::make_unique<Plan>();
  FinalizePlan(handle, g, *plan);
  // The workspace: the dq accumulator, the row sums, then the engine's.
  plan->scratch = {{kGradQAcc, x.b * x.h * x.s * x.d * 4},
                   {kRowSum, x.b * x.h * x.s * 4}};
  return plan;
}

// Per thread (cuDNN handles and plans are not for concurrent use): one
// handle per device and the plans built so far.
struct ThreadState {
  std::map<int, cudnnHandle_t> handles;
  using Key = std::tuple<bool, int, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, bool>;
  std::map<Key, std::unique_ptr<Plan>> plans;
  ~ThreadState() {
    plans.clear();
    for (auto& [device, handle] : handles) cudnnDestroy(handle);
  }
};

ThreadState& State() {
  thread_local ThreadState state;
  return state;
}

// The handle of `device` on this thread, bound to its current stream.
cudnnHandle_t HandleFor(int device) {
  SetCudaDevice(device);
  ThreadState& state = State();
  auto it = state.handles.find(device);
  if (it == state.handles.end()) {
    cudnnHandle_t handle = nullptr;
    LC_CUDNN_BUILD(cudnnCreate(&handle));
    it = state.handles.emplace(device, handle).first;
  }
  LC_CUDNN_CHECK(cudnnSetStream(it->second, CurrentCudaStream(device)));
  return it->second;
}

// The cached plan of `x` in direction `backward`, built on first use. A
// shape whose build failed is not cached: it throws again (callers
// remember the fallback themselves).
Plan& PlanFor(bool backward, const CudnnSdpaShape& x, cudnnHandle_t handle) {
  ThreadState& state = State();
  const ThreadState::Key key{backward,     x.device, x.b,          x.h,
                             x.s,          x.d,      x.strides[0], x.strides[1],
                             x.strides[2], x.causal};
  auto it = state.plans.find(key);
  if (it == state.plans.end()) {
    it = state.plans
             .emplace(key, backward ? BuildBackward(handle, x)
                                    : BuildForward(handle, x))
             .first;
  }
  return *it->second;
}

void Execute(cudnnHandle_t handle, const Plan& plan, int device,
             std::vector<int64_t> uids, std::vector<void*> pointers) {
  auto aligned = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  int64_t bytes = plan.engine_bytes;
  for (const auto& [uid, size] : plan.scratch) bytes += aligned(size);
  Tensor workspace;  // [scratch tensors | engine's part] bytes
  char* ws = nullptr;
  if (bytes > 0) {
    workspace = Empty({bytes}, DType::kUInt8, Device::Cuda(device));
    ws = static_cast<char*>(workspace.raw_data());
  }
  int64_t used = 0;
  for (const auto& [uid, size] : plan.scratch) {
    uids.push_back(uid);
    pointers.push_back(ws + used);
    used += aligned(size);
  }
  void* engine_ws = plan.engine_bytes > 0 ? ws + used : nullptr;
  Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.Set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
           static_cast<int64_t>(uids.size()), uids.data())
      .Set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
           static_cast<int64_t>(pointers.size()), pointers.data())
      .Set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1,
           &engine_ws)
      .Finalize();
  LC_CUDNN_CHECK(cudnnBackendExecute(handle, plan.plan, pack.get()));
}

}  // namespace

absl::Status CudnnSdpaForward(const CudnnSdpaShape& shape, const void* q,
                              const void* k, const void* v, void* out,
                              float* stats) {
  return StatusFromCall([&] {
    cudnnHandle_t handle = HandleFor(shape.device);
    const Plan& plan = PlanFor(false, shape, handle);
    float scale = shape.scale;
    float neg_inf = -std::numeric_limits<float>::infinity();
    std::vector<int64_t> uids{kQ, kK, kV, kO, kStats, kScale};
    std::vector<void*> pointers{const_cast<void*>(q),
                                const_cast<void*>(k),
                                const_cast<void*>(v),
                                out,
                                stats,
                                &scale};
    if (shape.causal) {
      uids.push_back(kNegInf);
      pointers.push_back(&neg_inf);
    }
    Execute(handle, plan, shape.device, uids, pointers);
  });
}

absl::Status CudnnSdpaBackward(const CudnnSdpaShape& shape, const void* q,
                               const void* k, const void* v, const void* out,
                               const void* grad_out, const float* stats,
                               void* dq, void* dk, void* dv) {
  return StatusFromCall([&] {
    cudnnHandle_t handle = HandleFor(shape.device);
    const Plan& plan = PlanFor(true, shape, handle);
    float scale = shape.scale, one = 1;
    float neg_inf = -std::numeric_limits<float>::infinity();
    std::vector<int64_t> uids{kQ,     kK,   kV,     kO,     kGradO, kStats,
                              kScale, kOne, kGradQ, kGradK, kGradV};
    std::vector<void*> pointers{const_cast<void*>(q),
                                const_cast<void*>(k),
                                const_cast<void*>(v),
                                const_cast<void*>(out),
                                const_cast<void*>(grad_out),
                                const_cast<float*>(stats),
                                &scale,
                                &one,
                                dq,
                                dk,
                                dv};
    if (shape.causal) {
      uids.push_back(kNegInf);
      pointers.push_back(&neg_inf);
    }
    Execute(handle, plan, shape.device, uids, pointers);
  });
}

}  // namespace lc
