#include "attention/ring_attention.h"

#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/attention_driver.h"
#include "attention/attention_kernel.h"
#include "attention/attention_plan.h"
#include "attention/ring_agreement.h"
#include "attention/ring_plan.h"
#include "core/autograd.h"
#include "core/status.h"
#include "distributed/ring_exchange.h"

namespace lc {
namespace {

// Message tags: each kind of payload has its own exchange and tags, so K, V
// and their gradients never share a receive buffer.
enum Tag : int {
  kKeyValueTags = 1,  // K, V
  kGradTags = 3,      // dK, dV on to the next holder
  kHomeTags = 5,      // dK, dV back to the chunk's owner
};

// The computation of one rank's ring steps: the driver of the inputs'
// device over the plan's layouts. out, lse and the gradient accumulators
// (dQ, and dK/dV that travel) are of acc(). Every host-side preparation
// (work lists, row maps) was done when the plan was made, so on CUDA the
// loop never waits for the device.
class RingKernels {
 public:
  RingKernels(const AttentionProblem& p, const RingPlan& plan,
              const AttentionDriver& driver)
      : p_(p), plan_(plan), driver_(driver) {}

  DType dtype() const { return driver_.ComputeDType(p_.dtype); }
  DType acc() const { return driver_.AccumulatorDType(p_.dtype); }
  Device device() const { return p_.device; }
  const TokenLayout& mine() const { return plan_.mine; }

  // The K/V pair of the chunk held at `step`, in its layout of that step,
  // cut down to the layout it goes on in (the plan has a row map exactly
  // where that layout holds fewer keys).
  std::vector<Tensor> Carry(int step, const std::vector<Tensor>& kv) const {
    const auto found = plan_.carry_maps.find(step);
    if (found == plan_.carry_maps.end()) return kv;
    const TokenLayout& to = plan_.steps[step].carried;
    std::vector<Tensor> packed;
    for (const Tensor& t : kv) {
      Tensor c = Empty(ChunkShape(p_, to), t.dtype(), device());
      driver_.GatherRows(t, found->second, c);
      packed.push_back(c);
    }
    return packed;
  }

  // Merges this rank's queries' attention over the keys of `kl` into out
  // and lse.
  void Forward(const AttentionCall& call, const Tensor& q,
               const TokenLayout& kl, const std::vector<Tensor>& kv,
               const Tensor& out, const Tensor& lse) const {
    driver_.Forward(p_, call, mine(), q, kl, kv[0], kv[1], out, lse);
  }

  // RowDelta of this rank's out and grad_out: [batch, heads, rows] of acc().
  Tensor Delta(const Tensor& out, const Tensor& grad_out) const {
    Tensor delta = Empty({p_.batch, p_.heads, mine().rows}, acc(), device());
    driver_.RowDelta(p_, out, grad_out, delta);
    return delta;
  }

  // Adds the gradients of this rank's queries against the keys of `kl`
  // into dq and grads (dK, dV of `kl`).
  void Backward(const AttentionCall& call, const Tensor& q,
                const TokenLayout& kl, const std::vector<Tensor>& kv,
                const Tensor& grad_out, const Tensor& lse, const Tensor& delta,
                const Tensor& grad_lse, const Tensor& dq,
                const std::vector<Tensor>& grads) const {
    driver_.Backward(p_, call, mine(), q, kl, kv[0], kv[1], grad_out, lse,
                     delta, grad_lse, dq, grads[0], grads[1]);
  }

  // dst (a buffer of this rank's tokens) += src, this rank's accumulator
  // that came home at `step` in its trip layout of that step.
  void AddHome(int step, const Tensor& src, const Tensor& dst) const {
    const auto found = plan_.home_maps.find(step);
    if (found == plan_.home_maps.end()) {  // home in this rank's own layout
      AddInPlace(dst, src);
      return;
    }
    driver_.AddRows(src, found->second, dst);
  }

 private:
  const AttentionProblem& p_;
  const RingPlan& plan_;
  const AttentionDriver& driver_;
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
                 const AttentionCall& call, const RingPlan& plan,
                 const RingKernels& kernels, const Tensor& q, const Tensor& k,
                 const Tensor& v, const Tensor& out, const Tensor& lse,
                 RingStats* stats) {
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
    if (step.needs) kernels.Forward(call, q, step.layout, cur.kv, out, lse);
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
                     const AttentionCall& call, const RingPlan& plan,
                     const RingKernels& kernels, const Tensor& q,
                     const Tensor& k, const Tensor& v, const Tensor& out,
                     const Tensor& lse, const Tensor& grad_out,
                     const Tensor& grad_lse, RingStats* stats) {
  const int r = plan.rank;
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
      kernels.Backward(call, q, step.layout, cur.kv, grad_out, lse, delta,
                       grad_lse, dq, cur.grads);
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

// Runs fn on this rank; an lc::Error it throws (a bad input, found before
// any communication, or a failure inside the ring) aborts the group with
// it, so that every rank fails at once: peers waiting in the agreement check
// or the ring would otherwise block until the timeout, which is what
// happens to ranks that RunRanks does not run (processes of their own).
template <typename Fn>
auto AbortingGroupOnError(Communicator& comm, Fn&& fn) {
  try {
    return fn();
  } catch (const Error& e) {
    comm.Abort(e.status());
    throw;
  }
}

class RingAttentionPlan final
    : public AttentionPlan,
      public std::enable_shared_from_this<RingAttentionPlan> {
 public:
  RingAttentionPlan(Communicator& comm, const TensorSpec& inputs, int64_t n,
                    const AttentionPattern& pattern,
                    const AttentionOptions& options, const RingOptions& ring)
      : comm_(comm),
        inputs_(inputs),
        driver_(AttentionDriverFor(inputs.device)),
        stats_(ring.stats) {
    const int size = comm.size(), rank = comm.rank();
    LC_REQUIRE(inputs.shape.size() == 4, "RingAttention: q has shape ",
               ShapeToString(inputs.shape),
               " (expected [batch, n_local, heads, head_dim])");
    const int64_t local = RankTokenCount(n, size, rank, ring.layout);
    LC_REQUIRE(inputs.shape[1] == local, "RingAttention: rank ", rank, " of ",
               size, " holds ", inputs.shape[1], " tokens but the ",
               SequenceLayoutName(ring.layout), " layout of n = ", n,
               " gives it ", local);
    std::shared_ptr<AttentionProblem> p =
        MakeAttentionProblem(inputs, n, pattern, options);
    CheckRingPlanAgreement(comm, *p, ring.layout);
    plan_ = MakeRingPlan(*p, size, rank, ring.layout);
    for (int s = 0; s <= plan_.last_step; ++s) {
      const RingStep& step = plan_.steps[s];
      if (step.needs) driver_.Prepare(*p, plan_.mine, step.layout);
    }
    p_ = std::move(p);
  }

  const TensorSpec& inputs() const override { return inputs_; }

  AttentionResult Run(const Tensor& q, const Tensor& k, const Tensor& v,
                      const AttentionCallOptions& options) const override {
    return AbortingGroupOnError(comm_,
                                [&] { return RunOnRank(q, k, v, options); });
  }

 private:
  AttentionResult RunOnRank(const Tensor& q, const Tensor& k, const Tensor& v,
                            const AttentionCallOptions& options) const {
    const AttentionProblem& p = *p_;
    CheckAttentionInputs("RingAttention", inputs_, q, k, v);
    AttentionCall call = MakeAttentionCall("RingAttention", p, options);
    // Dropout draws rank 0's stream on every rank (see RingAttention).
    if (p.dropout > 0 || call.key_padding.defined()) {
      call.dropout_seed = CheckRingCallAgreement(comm_, p, call);
    }
    const RingKernels kernels(p, plan_, driver_);
    const DType compute = kernels.dtype(), acc = kernels.acc();
    // (bfloat16 on the CPU: converted here, differentiably.)
    const Tensor qc = q.to(compute).contiguous();
    const Tensor kc = k.to(compute).contiguous();
    const Tensor vc = v.to(compute).contiguous();
    Tensor out = Zeros(qc.shape(), acc, p.device);
    Tensor lse = Full({p.batch, p.heads, p.rows},
                      -std::numeric_limits<double>::infinity(), acc, p.device);
    RingForward(comm_, p, call, plan_, kernels, qc, kc, vc, out, lse, stats_);
    if (acc != compute) out = out.to(compute);
    if (NeedsGrad({qc, kc, vc})) {
      RecordOp("RingAttention", {qc, kc, vc}, {&out, &lse},
               /*saved=*/{qc, kc, vc, out, lse},
               [self = shared_from_this(), call, q = qc.detach(),
                k = kc.detach(), v = vc.detach(), out = out.detach(),
                lse = lse.detach()](const Tensors& g) -> Tensors {
                 return self->Backward(call, q, k, v, out, lse, g);
               });
    }
    if (compute != p.dtype) out = out.to(p.dtype);
    return {out, lse};
  }

  Tensors Backward(const AttentionCall& call, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensors& g) const {
    return AbortingGroupOnError(comm_, [&] {
      const RingKernels kernels(*p_, plan_, driver_);
      Tensors grads =
          RingBackward(comm_, *p_, call, plan_, kernels, q, k, v, out, lse,
                       g[0].contiguous(), g[1].contiguous(), stats_);
      for (Tensor& grad : grads) {
        if (grad.dtype() != q.dtype()) grad = grad.to(q.dtype());
      }
      return grads;
    });
  }

  Communicator& comm_;
  const TensorSpec inputs_;
  const AttentionDriver& driver_;
  RingStats* const stats_;
  std::shared_ptr<const AttentionProblem> p_;
  RingPlan plan_;
};

}  // namespace

std::shared_ptr<const AttentionPlan> MakeRingAttentionPlan(
    Communicator& comm, const TensorSpec& inputs, int64_t n,
    const AttentionPattern& pattern, const AttentionOptions& options,
    const RingOptions& ring) {
  return AbortingGroupOnError(comm, [&] {
    return std::shared_ptr<const AttentionPlan>(
        std::make_shared<const RingAttentionPlan>(comm, inputs, n, pattern,
                                                  options, ring));
  });
}

AttentionResult RingAttention(Communicator& comm, const Tensor& q,
                              const Tensor& k, const Tensor& v, int64_t n,
                              const AttentionPattern& pattern,
                              const AttentionOptions& options,
                              const RingOptions& ring,
                              const AttentionCallOptions& call) {
  AbortingGroupOnError(comm, [&] {
    LC_REQUIRE(q.defined() && q.dim() == 4, "RingAttention: q has shape ",
               q.defined() ? ShapeToString(q.shape()) : "undefined",
               " (expected [batch, n_local, heads, head_dim])");
    // Before the plan allocates and its agreement check communicates.
    CheckAttentionInputs("RingAttention", SpecOf(q), q, k, v);
    CheckKeyPaddingMask("RingAttention", call.key_padding_mask, q.size(0), n);
  });
  return MakeRingAttentionPlan(comm, SpecOf(q), n, pattern, options, ring)
      ->Run(q, k, v, call);
}

}  // namespace lc
