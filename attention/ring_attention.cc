#include "attention/ring_attention.h"

#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/attention_kernel.h"
#include "core/autograd.h"
#include "core/status.h"

namespace lc {
namespace {

// Message tags: each kind of payload has its own queue per pair of ranks, so
// K, V and their gradients never share a receive buffer.
enum Tag : int {
  kKeyTag = 1,
  kValueTag,
  kGradKeyTag,
  kGradValueTag,
  kHomeGradKeyTag,
  kHomeGradValueTag,
};

// Which chunk pairs have work, known identically on every rank, so that
// senders and receivers agree on every transfer without asking each other.
struct RingPlan {
  int size = 1, rank = 0;
  std::vector<TokenLayout> layouts;      // per rank: its tokens' global spans
  std::vector<std::vector<bool>> needs;  // needs[holder][origin]
  int last_step = 0;                     // the last ring step any rank computes

  int Origin(int holder, int step) const {
    return ((holder - step) % size + size) % size;
  }
  // Whether the chunk of `origin`, held at `step` by origin + step, must go
  // on to the next rank: some later holder up to last_step needs it.
  bool Forwarded(int origin, int step) const {
    for (int s = step + 1; s <= last_step; ++s) {
      if (needs[(origin + s) % size][origin]) return true;
    }
    return false;
  }
  // The last step at which the chunk of `origin` is held by some rank.
  int FinalStep(int origin) const {
    int s = 0;
    while (s < last_step && Forwarded(origin, s)) ++s;
    return s;
  }
};

RingPlan MakePlan(const AttentionProblem& p, int size, int rank,
                  SequenceLayout layout) {
  RingPlan plan;
  plan.size = size;
  plan.rank = rank;
  for (int r = 0; r < size; ++r) {
    plan.layouts.push_back(TokenLayoutOf(RankSpans(p.n, size, r, layout)));
  }
  plan.needs.assign(size, std::vector<bool>(size, false));
  for (int holder = 0; holder < size; ++holder) {
    for (int origin = 0; origin < size; ++origin) {
      plan.needs[holder][origin] =
          HasTiles(p, plan.layouts[holder], plan.layouts[origin]);
      if (plan.needs[holder][origin]) {
        const int step = ((holder - origin) % size + size) % size;
        plan.last_step = std::max(plan.last_step, step);
      }
    }
  }
  return plan;
}

// A [batch, rows, heads, head_dim] view at the front of a flat buffer.
Tensor ChunkView(const Tensor& flat, const AttentionProblem& p, int64_t rows) {
  return flat.slice(0, 0, p.batch * rows * p.heads * p.head_dim)
      .view({p.batch, rows, p.heads, p.head_dim});
}

// Posts transfers and waits for them, turning failures into lc::Error after
// aborting the group (so the other ranks stop waiting at once).
class Transfers {
 public:
  Transfers(Communicator& comm, RingStats* stats)
      : comm_(comm), stats_(stats) {}

  // Posts between Start() and Finish() form one batch (see
  // Communicator::StartBatch).
  void Start() { Check(comm_.StartBatch()); }
  void Finish() { Check(comm_.EndBatch()); }

  void Send(const Tensor& t, int dst, int tag) {
    Post(comm_.Send(t, dst, tag));
    if (stats_ != nullptr) {
      stats_->bytes_sent += t.numel() * DTypeSize(t.dtype());
      ++stats_->transfers;
    }
  }
  void Recv(const Tensor& t, int src, int tag) {
    Post(comm_.Recv(t, src, tag));
  }
  void WaitAll() {
    absl::Status first;
    for (auto& work : pending_) {
      absl::Status s = work->Wait();
      if (first.ok() && !s.ok()) first = s;
    }
    pending_.clear();
    if (!first.ok()) Fail(first);
  }

 private:
  void Check(const absl::Status& status) {
    if (!status.ok()) Fail(status);
  }
  void Post(absl::StatusOr<std::unique_ptr<Work>> work) {
    Check(work.status());
    pending_.push_back(*std::move(work));
  }
  [[noreturn]] void Fail(const absl::Status& status) {
    comm_.Abort(status);
    throw Error(absl::Status(
        status.code(), absl::StrCat("RingAttention on rank ", comm_.rank(),
                                    ": ", status.message())));
  }

  Communicator& comm_;
  RingStats* stats_;
  std::vector<std::unique_ptr<Work>> pending_;
};

int64_t MaxRows(const RingPlan& plan) {
  int64_t rows = 0;
  for (const TokenLayout& l : plan.layouts) rows = std::max(rows, l.rows);
  return rows;
}

template <typename T>
void RingForward(Communicator& comm, const AttentionProblem& p,
                 const RingPlan& plan, const Tensor& q, const Tensor& k,
                 const Tensor& v, const Tensor& out, const Tensor& lse,
                 RingStats* stats) {
  const int r = plan.rank, size = plan.size;
  const int next = (r + 1) % size, prev = (r + size - 1) % size;
  const int64_t chunk = p.batch * MaxRows(plan) * p.heads * p.head_dim;
  // Two receive buffers per payload, alternating: step s computes on one
  // while step s+1's chunk arrives in the other.
  Tensor key_buffers[2], value_buffers[2];
  Tensor cur_k = k, cur_v = v;
  Transfers transfers(comm, stats);
  for (int s = 0; s <= plan.last_step; ++s) {
    const int origin = plan.Origin(r, s);
    Tensor next_k, next_v;
    transfers.Start();
    if (s < plan.last_step) {
      if (plan.Forwarded(origin, s)) {
        transfers.Send(cur_k, next, kKeyTag);
        transfers.Send(cur_v, next, kValueTag);
      }
      const int incoming = plan.Origin(prev, s);
      if (plan.Forwarded(incoming, s)) {
        Tensor& kb = key_buffers[s % 2];
        Tensor& vb = value_buffers[s % 2];
        if (!kb.defined()) kb = Empty({chunk}, q.dtype());
        if (!vb.defined()) vb = Empty({chunk}, q.dtype());
        next_k = ChunkView(kb, p, plan.layouts[incoming].rows);
        next_v = ChunkView(vb, p, plan.layouts[incoming].rows);
        transfers.Recv(next_k, prev, kKeyTag);
        transfers.Recv(next_v, prev, kValueTag);
      }
    }
    transfers.Finish();
    if (plan.needs[r][origin]) {
      AttentionForwardTiles<T>(p, plan.layouts[r], q.data<T>(),
                               plan.layouts[origin], cur_k.data<T>(),
                               cur_v.data<T>(), out.data<T>(), lse.data<T>());
      if (stats != nullptr) ++stats->steps_computed;
    } else if (stats != nullptr) {
      ++stats->steps_skipped;
    }
    transfers.WaitAll();
    cur_k = next_k;
    cur_v = next_v;
  }
}

template <typename T>
Tensors RingBackward(Communicator& comm, const AttentionProblem& p,
                     const RingPlan& plan, const Tensor& q, const Tensor& k,
                     const Tensor& v, const Tensor& out, const Tensor& lse,
                     const Tensor& grad_out, const Tensor& grad_lse,
                     RingStats* stats) {
  const int r = plan.rank, size = plan.size;
  const int next = (r + 1) % size, prev = (r + size - 1) % size;
  const TokenLayout& mine = plan.layouts[r];
  const int64_t chunk = p.batch * MaxRows(plan) * p.heads * p.head_dim;
  std::vector<T> delta(p.batch * p.heads * mine.rows);
  RowDelta<T>(p, mine.rows, out.data<T>(), grad_out.data<T>(), delta.data());

  Tensor dq = ZerosLike(q);
  // The accumulators of the chunk this rank holds; they start as ours.
  Tensor cur_k = k, cur_v = v, cur_dk = ZerosLike(k), cur_dv = ZerosLike(v);
  Tensor buffers[4][2];  // k, v, dk, dv receive buffers, alternating
  Transfers transfers(comm, stats);

  // A chunk's gradients go home from the rank where its trip ends, in the
  // same step (so no rank keeps more than the chunk it holds); ours arrive
  // at step final_step from the last rank that holds our chunk.
  const int final_step = plan.FinalStep(r);
  Tensor own_dk = cur_dk, own_dv = cur_dv;
  Tensor home_dk, home_dv;
  for (int s = 0; s <= plan.last_step; ++s) {
    const int origin = plan.Origin(r, s);
    const bool forward_chunk = s < plan.last_step && plan.Forwarded(origin, s);
    const int incoming = plan.Origin(prev, s);
    const bool receive_chunk =
        s < plan.last_step && plan.Forwarded(incoming, s);
    Tensor next_chunk[4];
    if (receive_chunk) {
      for (int i = 0; i < 4; ++i) {
        if (!buffers[i][s % 2].defined()) {
          buffers[i][s % 2] = Empty({chunk}, q.dtype());
        }
        next_chunk[i] =
            ChunkView(buffers[i][s % 2], p, plan.layouts[incoming].rows);
      }
    }
    // K and V move while this step computes.
    transfers.Start();
    if (forward_chunk) {
      transfers.Send(cur_k, next, kKeyTag);
      transfers.Send(cur_v, next, kValueTag);
    }
    if (receive_chunk) {
      transfers.Recv(next_chunk[0], prev, kKeyTag);
      transfers.Recv(next_chunk[1], prev, kValueTag);
    }
    transfers.Finish();
    if (plan.needs[r][origin]) {
      AttentionBackwardTiles<T>(
          p, mine, q.data<T>(), plan.layouts[origin], cur_k.data<T>(),
          cur_v.data<T>(), grad_out.data<T>(), lse.data<T>(), delta.data(),
          grad_lse.data<T>(), dq.data<T>(), cur_dk.data<T>(), cur_dv.data<T>());
      if (stats != nullptr) ++stats->steps_computed;
    } else if (stats != nullptr) {
      ++stats->steps_skipped;
    }
    // The gradient accumulators leave only after this step added to them.
    const bool holding = s == 0 || plan.Forwarded(origin, s - 1);
    transfers.Start();
    if (forward_chunk) {
      transfers.Send(cur_dk, next, kGradKeyTag);
      transfers.Send(cur_dv, next, kGradValueTag);
    } else if (holding && origin != r) {
      transfers.Send(cur_dk, origin, kHomeGradKeyTag);
      transfers.Send(cur_dv, origin, kHomeGradValueTag);
    }
    if (final_step > 0 && s == final_step) {
      home_dk = Empty(k.shape(), k.dtype());
      home_dv = Empty(v.shape(), v.dtype());
      transfers.Recv(home_dk, (r + final_step) % size, kHomeGradKeyTag);
      transfers.Recv(home_dv, (r + final_step) % size, kHomeGradValueTag);
    }
    if (receive_chunk) {
      transfers.Recv(next_chunk[2], prev, kGradKeyTag);
      transfers.Recv(next_chunk[3], prev, kGradValueTag);
    }
    transfers.Finish();
    transfers.WaitAll();
    cur_k = next_chunk[0];
    cur_v = next_chunk[1];
    cur_dk = next_chunk[2];
    cur_dv = next_chunk[3];
  }
  if (final_step > 0) return {dq, home_dk, home_dv};
  return {dq, own_dk, own_dv};
}

}  // namespace

AttentionResult RingAttention(Communicator& comm, const Tensor& q,
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
  if (q.dtype() == DType::kBFloat16 && k.defined() && v.defined() &&
      k.dtype() == q.dtype() && v.dtype() == q.dtype()) {
    AttentionResult r =
        RingAttention(comm, q.to(DType::kFloat32), k.to(DType::kFloat32),
                      v.to(DType::kFloat32), n, pattern, options, ring);
    return {r.out.to(DType::kBFloat16), r.lse};
  }
  std::shared_ptr<const AttentionProblem> p =
      MakeAttentionProblem(q, k, v, n, pattern, options);
  auto plan =
      std::make_shared<const RingPlan>(MakePlan(*p, size, rank, ring.layout));
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Tensor out = Zeros(q.shape(), q.dtype());
  Tensor lse = Full({p->batch, p->heads, local},
                    -std::numeric_limits<double>::infinity(), q.dtype());
  if (q.dtype() == DType::kFloat32) {
    RingForward<float>(comm, *p, *plan, qc, kc, vc, out, lse, ring.stats);
  } else {
    RingForward<double>(comm, *p, *plan, qc, kc, vc, out, lse, ring.stats);
  }
  if (NeedsGrad({qc, kc, vc})) {
    Communicator* comm_ptr = &comm;
    RingStats* stats = ring.stats;
    RecordOp("RingAttention", {qc, kc, vc}, {&out, &lse},
             [comm_ptr, stats, p, plan, q = qc.detach(), k = kc.detach(),
              v = vc.detach(), out = out.detach(),
              lse = lse.detach()](const Tensors& g) -> Tensors {
               const Tensor grad_out = g[0].contiguous();
               const Tensor grad_lse = g[1].contiguous();
               if (q.dtype() == DType::kFloat32) {
                 return RingBackward<float>(*comm_ptr, *p, *plan, q, k, v, out,
                                            lse, grad_out, grad_lse, stats);
               }
               return RingBackward<double>(*comm_ptr, *p, *plan, q, k, v, out,
                                           lse, grad_out, grad_lse, stats);
             });
  }
  return {out, lse};
}

}  // namespace lc
