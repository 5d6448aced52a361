#include "distributed/thread_communicator.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/status.h"
#include "distributed/communicator_util.h"

namespace lc {
namespace {

using distributed_internal::ByteSize;
using distributed_internal::CallRank;
using distributed_internal::CheckContiguous;
using distributed_internal::CheckDefined;
using distributed_internal::CollectiveKind;
using distributed_internal::CollectiveLabel;
using distributed_internal::DescribeTensor;
using distributed_internal::DescribeTransfer;
using distributed_internal::DifferentCollectives;
using distributed_internal::DifferentRoots;
using distributed_internal::DifferentTensors;
using distributed_internal::PerRank;
using distributed_internal::SendRecvMismatch;

// OK, or InvalidArgument naming `what` when the tensor is undefined or
// strided (a tensor without elements has no layout to get wrong).
absl::Status CheckTensorArgument(const std::string& what, const Tensor& t) {
  LC_RETURN_IF_ERROR(CheckDefined(what, t));
  if (t.numel() == 0) return absl::OkStatus();
  return CheckContiguous(what, t);
}

// ---- Point-to-point ----

enum class TransferState {
  kQueued,   // posted, waiting for its partner
  kCopying,  // matched; the thread that posted second is copying the bytes
  kDone,     // status is final
};

struct Transfer {
  bool is_send = false;
  int rank = 0;  // the rank that posted it
  int peer = 0;
  int tag = 0;
  Tensor tensor;  // a detached handle: the group never touches the caller's
  // CUDA tensors: recorded at the post on the poster's current stream, so
  // the copy follows the tensor's producers (a send) or the last readers of
  // the receive buffer (a receive).
  std::unique_ptr<CudaEvent> ready;
  // CUDA tensors, once the copy is queued: recorded after it on the copy
  // stream (shared by both sides of the transfer).
  std::shared_ptr<CudaEvent> copied;
  TransferState state = TransferState::kQueued;
  absl::Status status;
  // Notified (with the group's mutex) when state becomes kDone: only this
  // transfer's waiter wakes, not every rank's (a shared condition woke all
  // k ranks for every transfer, O(k^2) wake-ups per ring step).
  std::condition_variable done;

  int src() const { return is_send ? rank : peer; }
  int dst() const { return is_send ? peer : rank; }
  std::string Describe() const {
    return DescribeTransfer(is_send, rank, peer, tag);
  }
};

// The posted, still unmatched transfers of one (src, dst, tag), oldest first.
// At most one of the two queues is non-empty.
struct Channel {
  std::deque<std::shared_ptr<Transfer>> sends;
  std::deque<std::shared_ptr<Transfer>> recvs;
};

// ---- Collectives ----

// What one rank brings to a collective.
struct Contribution {
  CollectiveKind kind = CollectiveKind::kBarrier;
  // The rank's input, detached (a view of it, not a copy); undefined for
  // Barrier and when local_error is set.
  Tensor input;
  // A CUDA input: recorded on the rank's current stream when it arrived.
  std::shared_ptr<CudaEvent> ready;
  int root = 0;  // Broadcast only
  // What the rank's own arguments got wrong; reported on every rank.
  absl::Status local_error;
};

// What a collective computed: undefined for Barrier; for CUDA inputs a
// tensor on rank 0's device, complete once `ready` has completed.
struct CollectiveResult {
  Tensor value;
  std::shared_ptr<CudaEvent> ready;
};

// One collective of the group: the n-th call of every rank.
struct Round {
  explicit Round(int size) : contributions(size), arrived(size, false) {}
  std::vector<Contribution> contributions;
  std::vector<bool> arrived;
  int num_arrived = 0;
  int num_departed = 0;  // the round is dropped when every rank has left it
  bool finished = false;
  absl::Status status;      // when finished; without the op/rank prefix
  CollectiveResult result;  // when finished and OK (not for Barrier)
  // Notified (with the group's mutex) when the round finishes or the group
  // is aborted.
  std::condition_variable settled;
};

double ToDouble(float v) { return v; }
double ToDouble(double v) { return v; }
double ToDouble(bfloat16 v) { return static_cast<float>(v); }

// sum[i] = x[i] (assign) or sum[i] += x[i], in float64.
template <typename T>
void AccumulateAsDouble(const Tensor& x, bool assign, double* sum) {
  const T* values = x.data<T>();
  const int64_t n = x.numel();
  if (assign) {
    for (int64_t i = 0; i < n; ++i) sum[i] = ToDouble(values[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) sum[i] += ToDouble(values[i]);
  }
}

// The element-wise sum of CPU tensors, added in rank order: float64 for
// floating dtypes, int64 (wrapping) for int64.
Tensor SumInRankOrder(const std::vector<Tensor>& inputs) {
  const Tensor& first = inputs[0];
  if (first.dtype() == DType::kInt64) {
    Tensor sum = Zeros(first.shape(), DType::kInt64);
    int64_t* s = sum.data<int64_t>();
    for (const Tensor& input : inputs) {
      const int64_t* x = input.data<int64_t>();
      for (int64_t i = 0; i < sum.numel(); ++i) {
        s[i] = static_cast<int64_t>(static_cast<uint64_t>(s[i]) +
                                    static_cast<uint64_t>(x[i]));
      }
    }
    return sum;
  }
  Tensor sum = Empty(first.shape(), DType::kFloat64);
  double* s = sum.data<double>();
  for (size_t r = 0; r < inputs.size(); ++r) {
    const Tensor& x = inputs[r];
    const bool assign = r == 0;
    switch (x.dtype()) {
      case DType::kFloat32:
        AccumulateAsDouble<float>(x, assign, s);
        break;
      case DType::kFloat64:
        AccumulateAsDouble<double>(x, assign, s);
        break;
      case DType::kBFloat16:
        AccumulateAsDouble<bfloat16>(x, assign, s);
        break;
      case DType::kInt64:
      case DType::kUInt8:
        LC_CHECK(false) << "AllReduceSum of " << DTypeName(x.dtype())
                        << " passed the dtype check";
    }
  }
  return sum;
}

// [size, ...]: every input (contiguous, all on `device`), by rank. On a CUDA
// device the copies are queued on the current stream.
Tensor StackInRankOrder(const std::vector<Tensor>& inputs, Device device) {
  const Tensor& first = inputs[0];
  Shape shape = first.shape();
  shape.insert(shape.begin(), static_cast<int64_t>(inputs.size()));
  Tensor stacked = Empty(shape, first.dtype(), device);
  const int64_t bytes = ByteSize(first);
  char* out = static_cast<char*>(stacked.raw_data());
  for (size_t r = 0; r < inputs.size(); ++r) {
    CopyBytes(out + r * bytes, device, inputs[r].raw_data(), device, bytes);
  }
  return stacked;
}

// A stream of CUDA device `device` that is never destroyed, one per `key`
// (created on first use): the copy stream of each sending rank (key: the
// rank) and the stream of the collectives (key: -1). The caching allocator
// records uses of blocks on these streams (RecordStream) that may be freed
// at any later time, after the group and its threads are gone.
cudaStream_t LongLivedStream(int key, int device) {
  static std::mutex mu;
  static auto* streams = new std::map<std::pair<int, int>, cudaStream_t>();
  std::lock_guard<std::mutex> lock(mu);
  cudaStream_t& stream = (*streams)[{key, device}];
  if (stream == nullptr) {
    SetCudaDevice(device);
    LC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  return stream;
}

cudaStream_t CopyStream(int rank, int device) {
  return LongLivedStream(rank, device);
}
cudaStream_t CollectiveStream(int device) {
  return LongLivedStream(-1, device);
}

// Marks a CUDA tensor's block as used by `stream` (a long-lived stream of its
// device), so the caching allocator reuses it only after the work queued
// there so far.
void RecordUse(const Tensor& t, cudaStream_t stream) {
  if (t.numel() > 0 && GetAllocator(t.device()) == DefaultCudaAllocator()) {
    RecordStream(*t.storage(), stream);
  }
}

// The result of a collective of CUDA inputs (every contribution's input on
// a CUDA device), computed on the collective stream of rank 0's device
// ("home") after each input's ready event, with the result's ready event
// recorded after it. AllReduceSum adds in rank order in float64 like the
// CPU path (int64: on the host after waiting for the inputs), so the
// results are bit-identical to the CPU's.
CollectiveResult CollectOnDevice(const std::vector<Contribution>& c) {
  const CollectiveKind kind = c[0].kind;
  const Device home = c[0].input.device();
  const cudaStream_t stream = CollectiveStream(home.index);
  const CudaStreamGuard on_stream(home.index, stream);
  // Rank r's input on the home device, read on `stream` after its
  // producers.
  const auto input = [&](size_t r) {
    const Tensor& x = c[r].input;
    c[r].ready->Wait(stream);
    if (x.device() == home) {
      RecordUse(x, stream);
      return x;
    }
    Tensor staged = Empty(x.shape(), x.dtype(), home);
    if (x.numel() > 0) {
      SetCudaDevice(home.index);
      LC_CUDA_CHECK(cudaMemcpyAsync(staged.raw_data(), x.raw_data(),
                                    static_cast<size_t>(ByteSize(x)),
                                    cudaMemcpyDefault, stream));
    }
    return staged;
  };
  CollectiveResult result;
  switch (kind) {
    case CollectiveKind::kAllReduceSum:
      if (c[0].input.dtype() == DType::kInt64) {
        std::vector<Tensor> host;
        for (const Contribution& x : c) {
          x.ready->Synchronize();
          host.push_back(x.input.to(Device::Cpu()));
        }
        result.value = SumInRankOrder(host).to(home);
      } else {
        result.value = Empty(c[0].input.shape(), DType::kFloat64, home);
        CopyInto(result.value, input(0));
        for (size_t r = 1; r < c.size(); ++r) {
          const Tensor x = input(r);
          AddInPlace(result.value, x.to(DType::kFloat64));
        }
      }
      break;
    case CollectiveKind::kAllGather: {
      std::vector<Tensor> inputs;
      for (size_t r = 0; r < c.size(); ++r) inputs.push_back(input(r));
      result.value = StackInRankOrder(inputs, home);
      break;
    }
    case CollectiveKind::kBroadcast:
      result.value = input(static_cast<size_t>(c[0].root)).clone();
      break;
    case CollectiveKind::kBarrier:
      LC_CHECK(false) << "Barrier has no inputs";
  }
  result.ready = std::make_shared<CudaEvent>(home.index);
  result.ready->Record(stream);
  return result;
}

// The state shared by the ranks of one group. All mutable state is guarded by
// mu_; the only work done outside it is copying the bytes of a matched
// transfer (by the thread that matched it, while both sides are kCopying and
// so untouched by anyone else; for CUDA tensors only queuing the copy) and
// each rank's copy of a collective's result into its own tensor.
class ThreadGroup {
 public:
  ThreadGroup(int size, std::chrono::milliseconds timeout)
      : size_(size),
        timeout_(timeout),
        next_generation_(size, 0),
        stats_(size) {}

  int size() const { return size_; }

  absl::StatusOr<std::unique_ptr<Work>> Post(
      const std::shared_ptr<ThreadGroup>& self, bool is_send, int rank,
      const Tensor& tensor, int peer, int tag);
  absl::Status Wait(Transfer& transfer);

  // Takes part in this rank's next collective; returns its result (undefined
  // for Barrier). The error message names the op, the collective's number and
  // the rank.
  absl::StatusOr<CollectiveResult> Rendezvous(int rank,
                                              Contribution contribution);

  void Abort(const absl::Status& reason);
  CommStats stats(int rank) const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_[rank];
  }
  void ResetStats(int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_[rank] = CommStats();
  }

 private:
  using ChannelKey = std::tuple<int, int, int>;  // src, dst, tag

  // Copies a matched pair's bytes (mu_ not held) and completes both.
  void Complete(Transfer& send, Transfer& recv);
  // Queues the copy between a matched pair of CUDA tensors on the sender's
  // copy stream of the receiver's device, after both tensors' ready events,
  // and records the pair's `copied` event after it.
  void CopyOnDevice(Transfer& send, Transfer& recv, int64_t bytes);
  // The following three need mu_ held.
  // Removes a queued transfer from its channel.
  void Withdraw(const Transfer& transfer);
  // Checks the contributions of a round every rank has joined and computes
  // its result.
  void Finish(Round& round);
  void CountCollective(const Round& round);
  std::string Timeout() const { return absl::StrCat(timeout_.count(), " ms"); }

  const int size_;
  const std::chrono::milliseconds timeout_;
  // std::mutex rather than absl::Mutex: ThreadSanitizer understands it even
  // though the system's abseil library is not instrumented.
  mutable std::mutex mu_;
  // Guarded by mu_ (waiters wait on the condition of their transfer or
  // round, with mu_):
  bool aborted_ = false;
  std::string abort_reason_;
  std::map<ChannelKey, Channel> channels_;
  // Per rank, the number of its next collective.
  std::vector<int64_t> next_generation_;
  std::map<int64_t, Round> rounds_;
  std::vector<CommStats> stats_;
};

class ThreadWork : public Work {
 public:
  ThreadWork(std::shared_ptr<ThreadGroup> group,
             std::shared_ptr<Transfer> transfer)
      : group_(std::move(group)), transfer_(std::move(transfer)) {}
  absl::Status Wait() override { return group_->Wait(*transfer_); }

 private:
  std::shared_ptr<ThreadGroup> group_;
  std::shared_ptr<Transfer> transfer_;
};

absl::StatusOr<std::unique_ptr<Work>> ThreadGroup::Post(
    const std::shared_ptr<ThreadGroup>& self, bool is_send, int rank,
    const Tensor& tensor, int peer, int tag) {
  auto transfer = std::make_shared<Transfer>();
  transfer->is_send = is_send;
  transfer->rank = rank;
  transfer->peer = peer;
  transfer->tag = tag;
  if (peer < 0 || peer >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(transfer->Describe(), ": peer rank ", peer,
                     " is out of range (expected 0 <= peer < ", size_, ")"));
  }
  const absl::Status argument = CheckTensorArgument(
      absl::StrCat(transfer->Describe(), ": the tensor"), tensor);
  if (!argument.ok()) return argument;
  transfer->tensor = tensor.detach();
  if (tensor.device().is_cuda()) {
    const absl::Status recorded = StatusFromCall([&] {
      const int device = tensor.device().index;
      transfer->ready = std::make_unique<CudaEvent>(device);
      transfer->ready->Record(CurrentCudaStream(device));
    });
    if (!recorded.ok()) {
      return absl::Status(
          recorded.code(),
          absl::StrCat(transfer->Describe(), ": ", recorded.message()));
    }
  }

  std::shared_ptr<Transfer> partner;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) {
      return absl::AbortedError(absl::StrCat(
          transfer->Describe(), ": the group was aborted: ", abort_reason_));
    }
    const ChannelKey key{transfer->src(), transfer->dst(), tag};
    Channel& channel = channels_[key];
    auto& waiting_partners = is_send ? channel.recvs : channel.sends;
    if (waiting_partners.empty()) {
      (is_send ? channel.sends : channel.recvs).push_back(transfer);
    } else {
      partner = std::move(waiting_partners.front());
      waiting_partners.pop_front();
      if (channel.sends.empty() && channel.recvs.empty()) channels_.erase(key);
      const Transfer& send = is_send ? *transfer : *partner;
      const Transfer& recv = is_send ? *partner : *transfer;
      std::string mismatch;
      if (send.tensor.shape() != recv.tensor.shape() ||
          send.tensor.dtype() != recv.tensor.dtype()) {
        mismatch = SendRecvMismatch(send.tensor, recv.tensor);
      } else if (send.tensor.device().is_cuda() !=
                 recv.tensor.device().is_cuda()) {
        mismatch = absl::StrCat(
            "the sent tensor is on ", send.tensor.device().ToString(),
            " but the receive tensor on ", recv.tensor.device().ToString(),
            " (expected both on the CPU or both on CUDA devices)");
      }
      if (!mismatch.empty()) {
        for (Transfer* t : {transfer.get(), partner.get()}) {
          t->state = TransferState::kDone;
          t->status = absl::InvalidArgumentError(
              absl::StrCat(t->Describe(), ": ", mismatch));
          t->done.notify_all();
        }
        partner = nullptr;
      } else {
        transfer->state = partner->state = TransferState::kCopying;
      }
    }
  }
  if (partner != nullptr) {
    Complete(is_send ? *transfer : *partner, is_send ? *partner : *transfer);
  }
  return std::make_unique<ThreadWork>(self, std::move(transfer));
}

void ThreadGroup::Complete(Transfer& send, Transfer& recv) {
  const int64_t bytes = ByteSize(send.tensor);
  const absl::Status copied = StatusFromCall([&] {
    if (recv.tensor.device().is_cuda()) {
      CopyOnDevice(send, recv, bytes);
    } else {
      CopyBytes(recv.tensor.raw_data(), recv.tensor.device(),
                send.tensor.raw_data(), send.tensor.device(), bytes);
    }
  });
  std::lock_guard<std::mutex> lock(mu_);
  for (Transfer* t : {&send, &recv}) {
    t->state = TransferState::kDone;
    t->status =
        copied.ok()
            ? absl::OkStatus()
            : absl::Status(copied.code(),
                           absl::StrCat(t->Describe(), ": ", copied.message()));
  }
  if (copied.ok()) {
    stats_[send.rank].bytes_sent += bytes;
    stats_[send.rank].messages_sent += 1;
    stats_[recv.rank].bytes_received += bytes;
    stats_[recv.rank].messages_received += 1;
  }
  send.done.notify_all();
  recv.done.notify_all();
}

void ThreadGroup::CopyOnDevice(Transfer& send, Transfer& recv, int64_t bytes) {
  const int device = recv.tensor.device().index;
  const cudaStream_t stream = CopyStream(send.rank, device);
  send.ready->Wait(stream);
  recv.ready->Wait(stream);
  if (bytes > 0) {
    SetCudaDevice(device);
    LC_CUDA_CHECK(
        cudaMemcpyAsync(recv.tensor.raw_data(), send.tensor.raw_data(),
                        static_cast<size_t>(bytes), cudaMemcpyDefault, stream));
  }
  auto copied = std::make_shared<CudaEvent>(device);
  copied->Record(stream);
  for (Transfer* t : {&send, &recv}) {
    // Neither block is reused before the copy ends, even if its tensor is
    // freed without a Wait (the other device's side, in a copy between two
    // devices, is kept by its Wait).
    if (t->tensor.device().index == device) RecordUse(t->tensor, stream);
    t->copied = copied;
  }
}

absl::Status ThreadGroup::Wait(Transfer& transfer) {
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  std::shared_ptr<CudaEvent> copied;
  {
    std::unique_lock<std::mutex> lock(mu_);
    const auto done = [&transfer]() {
      return transfer.state == TransferState::kDone;
    };
    if (!transfer.done.wait_until(lock, deadline, done)) {
      if (transfer.state == TransferState::kQueued) {
        Withdraw(transfer);
        transfer.state = TransferState::kDone;
        transfer.status = absl::DeadlineExceededError(
            absl::StrCat(transfer.Describe(), ": no matching ",
                         transfer.is_send ? "Recv" : "Send",
                         " was posted within ", Timeout()));
      } else {
        // Matched: the partner's thread is copying the bytes (or queuing
        // the copy) right now, a bounded step; returning before it ends
        // would let the caller reuse a buffer still being read or written.
        transfer.done.wait(lock, done);
      }
    }
    if (!transfer.status.ok()) return transfer.status;
    copied = transfer.copied;
  }
  if (copied == nullptr) return absl::OkStatus();
  // CUDA tensors: later work on the caller's current stream follows the
  // copy.
  const absl::Status waited = StatusFromCall(
      [&] { copied->Wait(CurrentCudaStream(transfer.tensor.device().index)); });
  if (waited.ok()) return waited;
  return absl::Status(
      waited.code(), absl::StrCat(transfer.Describe(), ": ", waited.message()));
}

void ThreadGroup::Withdraw(const Transfer& transfer) {
  const ChannelKey key{transfer.src(), transfer.dst(), transfer.tag};
  auto it = channels_.find(key);
  LC_CHECK(it != channels_.end()) << transfer.Describe() << " is not queued";
  auto& queue = transfer.is_send ? it->second.sends : it->second.recvs;
  queue.erase(std::find_if(queue.begin(), queue.end(),
                           [&](const std::shared_ptr<Transfer>& t) {
                             return t.get() == &transfer;
                           }));
  if (it->second.sends.empty() && it->second.recvs.empty()) {
    channels_.erase(it);
  }
}

void ThreadGroup::Abort(const absl::Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (aborted_) return;
  aborted_ = true;
  abort_reason_ = reason.ToString();
  for (auto& [key, channel] : channels_) {
    for (auto* queue : {&channel.sends, &channel.recvs}) {
      for (const std::shared_ptr<Transfer>& t : *queue) {
        t->state = TransferState::kDone;
        t->status = absl::AbortedError(absl::StrCat(
            t->Describe(), ": the group was aborted: ", abort_reason_));
        t->done.notify_all();
      }
    }
  }
  channels_.clear();
  for (auto& [generation, round] : rounds_) round.settled.notify_all();
}

absl::StatusOr<CollectiveResult> ThreadGroup::Rendezvous(
    int rank, Contribution contribution) {
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  const CollectiveKind kind = contribution.kind;
  std::unique_lock<std::mutex> lock(mu_);
  const int64_t generation = next_generation_[rank]++;
  const auto error = [&](absl::StatusCode code, absl::string_view message) {
    return absl::Status(
        code,
        absl::StrCat(CollectiveLabel(kind, generation, rank), ": ", message));
  };
  if (aborted_) {
    return error(absl::StatusCode::kAborted,
                 absl::StrCat("the group was aborted: ", abort_reason_));
  }
  Round& round = rounds_.try_emplace(generation, size_).first->second;
  // A round that already failed (a rank did not arrive in time) is not
  // joined: this rank only learns the error.
  if (!round.finished) {
    round.contributions[rank] = std::move(contribution);
    round.arrived[rank] = true;
    if (++round.num_arrived == size_) {
      Finish(round);
    } else {
      const auto settled = [&]() { return round.finished || aborted_; };
      if (!round.settled.wait_until(lock, deadline, settled)) {
        std::vector<int> missing, present;
        for (int r = 0; r < size_; ++r) {
          (round.arrived[r] ? present : missing).push_back(r);
        }
        round.finished = true;
        round.status = absl::DeadlineExceededError(absl::StrCat(
            "rank(s) ", absl::StrJoin(missing, ", "), " did not arrive within ",
            Timeout(), " (arrived: rank(s) ", absl::StrJoin(present, ", "),
            ")"));
        round.contributions.clear();
        round.settled.notify_all();
      }
    }
  }
  absl::Status status;
  CollectiveResult result;
  if (round.finished) {
    status = round.status;
    result = round.result;
  } else {
    status = absl::AbortedError(
        absl::StrCat("the group was aborted: ", abort_reason_));
  }
  if (++round.num_departed == size_) rounds_.erase(generation);
  if (!status.ok()) return error(status.code(), status.message());
  return result;
}

void ThreadGroup::Finish(Round& round) {
  round.finished = true;
  round.settled.notify_all();
  const std::vector<Contribution>& c = round.contributions;
  const CollectiveKind kind = c[0].kind;
  if (std::any_of(c.begin(), c.end(),
                  [&](const Contribution& x) { return x.kind != kind; })) {
    round.status = absl::InvalidArgumentError(
        DifferentCollectives(c, [](const Contribution& x) { return x.kind; }));
    return;
  }
  std::vector<std::string> local_errors;
  for (int r = 0; r < size_; ++r) {
    if (!c[r].local_error.ok()) {
      local_errors.push_back(
          absl::StrCat("rank ", r, ": ", c[r].local_error.message()));
    }
  }
  if (!local_errors.empty()) {
    round.status =
        absl::InvalidArgumentError(absl::StrJoin(local_errors, "; "));
    return;
  }
  if (kind == CollectiveKind::kBarrier) return;
  if (kind == CollectiveKind::kBroadcast &&
      std::any_of(c.begin(), c.end(),
                  [&](const Contribution& x) { return x.root != c[0].root; })) {
    round.status = absl::InvalidArgumentError(
        DifferentRoots(c, [](const Contribution& x) { return x.root; }));
    return;
  }
  const Tensor& first = c[0].input;
  if (std::any_of(c.begin(), c.end(), [&](const Contribution& x) {
        return x.input.shape() != first.shape() ||
               x.input.dtype() != first.dtype();
      })) {
    round.status = absl::InvalidArgumentError(DifferentTensors(
        c, [](const Contribution& x) { return DescribeTensor(x.input); }));
    return;
  }
  const bool cuda = first.device().is_cuda();
  if (std::any_of(c.begin(), c.end(), [&](const Contribution& x) {
        return x.input.device().is_cuda() != cuda;
      })) {
    round.status = absl::InvalidArgumentError(absl::StrCat(
        "the tensors lie on different kinds of devices: ",
        PerRank(
            c,
            [](const Contribution& x) { return x.input.device().ToString(); }),
        " (expected every rank's tensor on the CPU or every rank's on a CUDA "
        "device)"));
    return;
  }
  round.status = StatusFromCall([&] {
    if (cuda) {
      round.result = CollectOnDevice(c);
      return;
    }
    std::vector<Tensor> inputs;
    for (const Contribution& x : c) inputs.push_back(x.input);
    switch (kind) {
      case CollectiveKind::kAllReduceSum:
        round.result.value = SumInRankOrder(inputs);
        break;
      case CollectiveKind::kAllGather:
        round.result.value = StackInRankOrder(inputs, Device::Cpu());
        break;
      case CollectiveKind::kBroadcast:
        round.result.value = c[c[0].root].input.clone();
        break;
      case CollectiveKind::kBarrier:
        break;
    }
  });
  if (round.status.ok()) CountCollective(round);
  // The inputs are no longer needed; do not keep them alive.
  round.contributions.clear();
}

void ThreadGroup::CountCollective(const Round& round) {
  const Contribution& first = round.contributions[0];
  const int64_t bytes = ByteSize(first.input);
  for (int r = 0; r < size_; ++r) {
    distributed_internal::CountCollective(first.kind, bytes, size_, r,
                                          first.root, stats_[r]);
  }
}

// A rank's contribution: `input` itself, detached (for a CUDA tensor with an
// event after its producers on the rank's current stream), unless its
// arguments are already wrong.
Contribution Contribute(CollectiveKind kind, const Tensor& input,
                        absl::Status local_error) {
  Contribution c;
  c.kind = kind;
  c.local_error = std::move(local_error);
  if (c.local_error.ok() && input.defined()) {
    c.input = input.detach();
    if (input.device().is_cuda()) {
      c.local_error = StatusFromCall([&] {
        const int device = input.device().index;
        c.ready = std::make_shared<CudaEvent>(device);
        c.ready->Record(CurrentCudaStream(device));
      });
    }
  }
  return c;
}

class ThreadCommunicator : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int rank)
      : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }

  absl::StatusOr<std::unique_ptr<Work>> Send(const Tensor& tensor, int dst,
                                             int tag) override {
    return group_->Post(group_, /*is_send=*/true, rank_, tensor, dst, tag);
  }
  absl::StatusOr<std::unique_ptr<Work>> Recv(const Tensor& tensor, int src,
                                             int tag) override {
    return group_->Post(group_, /*is_send=*/false, rank_, tensor, src, tag);
  }

  absl::Status AllReduceSum(const Tensor& tensor) override {
    absl::Status local = CheckTensorArgument("the tensor", tensor);
    if (local.ok() &&
        !(IsFloating(tensor.dtype()) || tensor.dtype() == DType::kInt64)) {
      local = absl::InvalidArgumentError(
          absl::StrCat("the tensor has dtype ", DTypeName(tensor.dtype()),
                       " (expected float32, float64, bfloat16 or int64)"));
    }
    LC_ASSIGN_OR_RETURN(
        const CollectiveResult sum,
        group_->Rendezvous(rank_, Contribute(CollectiveKind::kAllReduceSum,
                                             tensor, std::move(local))));
    return TakeResult("AllReduceSum", sum, tensor, &tensor);
  }

  absl::Status AllGather(const Tensor& input, const Tensor& output) override {
    absl::Status local = CheckTensorArgument("the input", input);
    if (local.ok()) local = CheckTensorArgument("the output", output);
    if (local.ok()) {
      Shape expected = input.shape();
      expected.insert(expected.begin(), size());
      if (output.shape() != expected || output.dtype() != input.dtype()) {
        local = absl::InvalidArgumentError(absl::StrCat(
            "the output ", DescribeTensor(output), " is not ",
            ShapeToString(expected), " ", DTypeName(input.dtype()),
            " ([size] + the input's shape, in the input's dtype)"));
      }
    }
    LC_ASSIGN_OR_RETURN(
        const CollectiveResult gathered,
        group_->Rendezvous(rank_, Contribute(CollectiveKind::kAllGather, input,
                                             std::move(local))));
    return TakeResult("AllGather", gathered, input, &output);
  }

  absl::Status Broadcast(const Tensor& tensor, int root) override {
    absl::Status local = CheckTensorArgument("the tensor", tensor);
    if (local.ok() && (root < 0 || root >= size())) {
      local = absl::InvalidArgumentError(
          absl::StrCat("root rank ", root,
                       " is out of range (expected 0 <= root < ", size(), ")"));
    }
    Contribution c =
        Contribute(CollectiveKind::kBroadcast, tensor, std::move(local));
    c.root = root;
    LC_ASSIGN_OR_RETURN(const CollectiveResult value,
                        group_->Rendezvous(rank_, std::move(c)));
    return TakeResult("Broadcast", value, tensor,
                      rank_ == root ? nullptr : &tensor);
  }

  absl::Status Barrier() override {
    return group_
        ->Rendezvous(rank_, Contribute(CollectiveKind::kBarrier, Tensor(),
                                       absl::OkStatus()))
        .status();
  }

  void Abort(const absl::Status& reason) override { group_->Abort(reason); }
  CommStats stats() const override { return group_->stats(rank_); }
  void ResetStats() override { group_->ResetStats(rank_); }

 private:
  // Copies a collective's result into `dst` (converting a float64 sum to
  // its dtype; none for Broadcast's root). For CUDA tensors, first makes
  // this thread's current streams of the devices of `input`, `dst` and the
  // result wait for the result, so that later work there follows the
  // collective, its reads of `input` included.
  absl::Status TakeResult(const char* op, const CollectiveResult& result,
                          const Tensor& input, const Tensor* dst) const {
    const absl::Status copied = StatusFromCall([&] {
      if (result.ready != nullptr) {
        for (const Tensor* t : {&input, dst, &result.value}) {
          if (t != nullptr && t->device().is_cuda()) {
            result.ready->Wait(CurrentCudaStream(t->device()));
          }
        }
      }
      if (dst == nullptr) return;
      CopyInto(*dst, result.value);
      if (result.ready != nullptr) {
        // The result's block returns to the collective stream's pool when
        // freed: that stream waits for this copy before anything reuses it.
        const int device = result.value.device().index;
        CudaEvent taken(device);
        taken.Record(CurrentCudaStream(device));
        taken.Wait(CollectiveStream(device));
      }
    });
    if (copied.ok()) return copied;
    return absl::Status(copied.code(), absl::StrCat(op, " on rank ", rank_,
                                                    ": ", copied.message()));
  }

  std::shared_ptr<ThreadGroup> group_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> MakeThreadGroup(
    int size, const ThreadGroupOptions& options) {
  LC_REQUIRE(size >= 1, "MakeThreadGroup: size ", size, " (expected >= 1)");
  LC_REQUIRE(options.timeout.count() > 0, "MakeThreadGroup: timeout ",
             options.timeout.count(), " ms (expected > 0)");
  auto group = std::make_shared<ThreadGroup>(size, options.timeout);
  std::vector<std::unique_ptr<Communicator>> communicators;
  for (int r = 0; r < size; ++r) {
    communicators.push_back(std::make_unique<ThreadCommunicator>(group, r));
  }
  return communicators;
}

absl::Status RunRanks(int k,
                      const std::function<absl::Status(Communicator&)>& fn,
                      const ThreadGroupOptions& options) {
  std::vector<std::unique_ptr<Communicator>> communicators;
  LC_RETURN_IF_ERROR(
      StatusFromCall([&] { communicators = MakeThreadGroup(k, options); }));
  std::mutex mu;
  absl::Status first_failure;
  std::vector<std::thread> threads;
  for (int r = 0; r < k; ++r) {
    threads.emplace_back([&, r] {
      const absl::Status status = CallRank(fn, *communicators[r]);
      if (status.ok()) return;
      const absl::Status failure(
          status.code(), absl::StrCat("rank ", r, ": ", status.message()));
      {
        std::lock_guard<std::mutex> lock(mu);
        // An Aborted error is an effect of another rank's failure. A rank
        // that aborted the group itself before returning (RingAttention on a
        // failed transfer) may report after the ranks it woke, so its error
        // replaces an Aborted one.
        const bool is_cause =
            first_failure.ok() ||
            (first_failure.code() == absl::StatusCode::kAborted &&
             status.code() != absl::StatusCode::kAborted);
        if (!is_cause) return;
        first_failure = failure;
      }
      communicators[r]->Abort(failure);
    });
  }
  for (std::thread& t : threads) t.join();
  return first_failure;
}

}  // namespace lc
