// Ring exchange of tensor bundles, the communication pattern of ring
// attention: at each step a rank sends a bundle of tensors (say a K/V chunk)
// to rank + 1 and receives rank - 1's bundle, both posted as one batch, so
// the next bundle is in flight while the rank computes on the current one.
// Every bundle member arrives in its own receive buffer (K never shares
// memory with V), and receive buffers come in two slots that alternate, so a
// bundle received at one step stays intact while the next one arrives. A
// failed post or wait aborts the group, so that the other ranks stop waiting
// at once, and returns the error. The exchange touches tensors only through
// Communicator::Send and Recv and allocates its buffers on the device it is
// asked for, so it works for every device the communicator supports. With
// CUDA tensors its waits are stream-ordered (Work::Wait): Wait() makes the
// caller's current stream wait for the transfers on the device, so compute
// queued between Post and Wait overlaps them, and a slot's buffers are
// rewritten only after the work queued before the post that reuses them.
#ifndef LONGCTX_DISTRIBUTED_RING_EXCHANGE_H_
#define LONGCTX_DISTRIBUTED_RING_EXCHANGE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "distributed/communicator.h"

namespace lc {

// The shape, dtype and device of a tensor to receive.
struct TensorSpec {
  Shape shape;
  DType dtype = DType::kFloat32;
  Device device = Device::Cpu();
};

class RingExchange {
 public:
  // Bundles of `members` tensors (>= 1). Member i travels with tag
  // first_tag + i, so exchanges that share a communicator need disjoint tag
  // ranges. Throws lc::Error for members < 1.
  RingExchange(Communicator& comm, int members, int first_tag);
  // Transfers still posted (an exception left a step unfinished) are
  // waited for after aborting the group, so no peer writes into a freed
  // buffer.
  ~RingExchange();
  RingExchange(const RingExchange&) = delete;
  RingExchange& operator=(const RingExchange&) = delete;

  // Posts one step as one batch: sends `send` (`members` contiguous
  // tensors, or none) to rank + 1 and receives a bundle shaped as `receive`
  // (`members` specs, or none) from rank - 1. Returns the received tensors
  // (none when `receive` is empty): views of the next slot's buffers, one
  // per member, to be used only after Wait() and only until the post after
  // next reuses their slot. The sent tensors must stay unchanged until
  // Wait(). An error (a bad argument, a failed post) aborts the group.
  absl::StatusOr<std::vector<Tensor>> Post(
      const std::vector<Tensor>& send, const std::vector<TensorSpec>& receive);
  // The same with other peers: sends to `dst`, receives from `src` (each
  // ignored when its bundle is empty).
  absl::StatusOr<std::vector<Tensor>> PostPeers(
      const std::vector<Tensor>& send, int dst,
      const std::vector<TensorSpec>& receive, int src);
  // Blocks until every transfer posted since the last Wait is done. The
  // first error (a timeout, an aborted group, a size mismatch) aborts the
  // group and is returned once the other transfers have ended too.
  absl::Status Wait();

  // What this exchange has posted to send since it was made: tensors and
  // their bytes.
  int64_t tensors_sent() const { return tensors_sent_; }
  int64_t bytes_sent() const { return bytes_sent_; }

 private:
  absl::Status Fail(absl::Status status);

  Communicator& comm_;
  const int members_;
  const int first_tag_;
  // slots_[slot][member]: flat receive buffers, grown on demand.
  std::vector<Tensor> slots_[2];
  int next_slot_ = 0;
  std::vector<std::unique_ptr<Work>> pending_;
  int64_t tensors_sent_ = 0;
  int64_t bytes_sent_ = 0;
};

}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_RING_EXCHANGE_H_
