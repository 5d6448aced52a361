// A one-shot TCP rendezvous for ranks started as separate processes (one per
// GPU) by a torchrun-style launcher: rank 0 listens on MASTER_PORT and hands a
// small payload (the NCCL unique id) to every other rank, which connects to
// MASTER_ADDR:MASTER_PORT. Needs no GPU. Every wait is bounded by the
// configured timeout: a rank 0 that never appears, a rank that never connects
// or a peer that stops answering is a DeadlineExceeded error, not a hang.
//
// Wire protocol (all integers big-endian):
//   client -> rank 0: magic "LCRV", version, rank, world size  (4 x uint32)
//   rank 0 -> client: magic, status (0 = ok, 1 = rejected), length (uint64),
//                     then `length` bytes: the payload, or why it was rejected
//   client -> rank 0: magic                                    (the ack)
// Rank 0 returns once every rank 1..size-1 has acknowledged the payload.
#ifndef LONGCTX_DISTRIBUTED_TCP_RENDEZVOUS_H_
#define LONGCTX_DISTRIBUTED_TCP_RENDEZVOUS_H_

#include <chrono>
#include <string>

#include "absl/status/statusor.h"

namespace lc {

struct RendezvousConfig {
  int rank = 0;        // 0 <= rank < world_size
  int world_size = 1;  // >= 1
  // Host name or IPv4/IPv6 address of rank 0 (where the other ranks connect;
  // rank 0 itself listens on every interface).
  std::string master_addr;
  int master_port = 0;  // 1..65535
  // Bounds the whole exchange on every rank (> 0).
  std::chrono::milliseconds timeout{60000};
};

// What a torchrun-style launcher tells each process.
struct LaunchEnvironment {
  RendezvousConfig rendezvous;  // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  int local_rank = 0;           // LOCAL_RANK (default RANK): the CUDA device
};

// Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK (optional,
// default RANK). InvalidArgument naming the variable and its value when one
// is missing, not an integer or out of range.
absl::StatusOr<LaunchEnvironment> ReadLaunchEnvironment(
    std::chrono::milliseconds timeout);

// Rank 0 serves `payload_from_rank0` (at most 1 MiB) to the other ranks and
// returns it; the other ranks ignore their argument and return what rank 0
// sent. With world_size 1 it returns the payload at once. Errors:
// InvalidArgument for a bad config or ranks that disagree on the world size
// (or two ranks with the same RANK), DeadlineExceeded past the timeout,
// Unavailable when rank 0 cannot listen or a peer drops the connection.
absl::StatusOr<std::string> ExchangeRendezvous(
    const RendezvousConfig& config, const std::string& payload_from_rank0);

}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_TCP_RENDEZVOUS_H_
