// The NCCL backend's 128-byte Descriptor: the header a point-to-point message
// carries ahead of its data (tag, dtype, shape), and what a rank contributes
// to the exchange that precedes every collective (kind, root, dtype, shape).
// The receiving side compares it with its own. Internal to distributed/.
#ifndef LONGCTX_DISTRIBUTED_NCCL_DESCRIPTOR_H_
#define LONGCTX_DISTRIBUTED_NCCL_DESCRIPTOR_H_

#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace lc {
namespace distributed_internal {

// Tensors of at most this many dimensions can be described on the wire.
constexpr int kMaxDims = 12;

// What a message carries ahead of its data, and what a rank contributes to
// the exchange that precedes every collective: 128 bytes the other side
// compares with its own.
struct Descriptor {
  int64_t op = 0;     // a message's tag; a collective's CollectiveKind
  int64_t root = 0;   // Broadcast's root
  int64_t dtype = 0;  // a DType, or kInvalidArguments
  int64_t ndim = 0;
  int64_t dims[kMaxDims] = {};
};
constexpr int64_t kDescriptorBytes = sizeof(Descriptor);
static_assert(kDescriptorBytes == 128, "Descriptor must stay 128 bytes");
// A rank whose collective arguments were wrong (it reports why itself).
constexpr int64_t kInvalidArguments = -1;

bool SameDescriptor(const Descriptor& a, const Descriptor& b);

// "[2, 3] float32".
std::string DescriptorTensor(const Descriptor& d);

// The descriptor of `t` with the given op and root.
Descriptor Describe(int64_t op, int64_t root, const Tensor& t);

}  // namespace distributed_internal
}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_NCCL_DESCRIPTOR_H_
