// Helpers of the tests that run code on k thread ranks (communicators, the
// ring exchange, ring attention; CPU and GPU): group options with a given
// timeout, a runner that returns each rank's own status, and point-to-point
// transfers that wait for completion.
#ifndef LONGCTX_TESTS_DISTRIBUTED_RANK_TEST_UTIL_H_
#define LONGCTX_TESTS_DISTRIBUTED_RANK_TEST_UTIL_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "core/status.h"
#include "core/tensor.h"
#include "distributed/communicator.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"

namespace lc {
namespace testing {

// Thread-group options whose waits give up after `milliseconds`.
inline ThreadGroupOptions Timeout(int64_t milliseconds) {
  ThreadGroupOptions options;
  options.timeout = std::chrono::milliseconds(milliseconds);
  return options;
}

// Runs fn on k thread ranks and returns each rank's own status, returned or
// thrown (lc::Error). fn reports OK to RunRanks, so a failing rank does not
// abort the others: whatever they wait on must stop them.
inline std::vector<absl::Status> EachRankStatus(
    int k, const std::function<absl::Status(Communicator&)>& fn,
    const ThreadGroupOptions& options = Timeout(20000)) {
  std::vector<absl::Status> statuses(k);
  const absl::Status all = RunRanks(
      k,
      [&](Communicator& comm) {
        absl::Status returned;
        const absl::Status thrown =
            StatusFromCall([&] { returned = fn(comm); });
        statuses[comm.rank()] = thrown.ok() ? returned : thrown;
        return absl::OkStatus();
      },
      options);
  EXPECT_TRUE(all.ok()) << all;
  return statuses;
}

// Send and Recv, then the wait for their completion.
inline absl::Status SendAndWait(Communicator& comm, const Tensor& t, int dst,
                                int tag = 0) {
  LC_ASSIGN_OR_RETURN(std::unique_ptr<Work> work, comm.Send(t, dst, tag));
  return work->Wait();
}
inline absl::Status RecvAndWait(Communicator& comm, const Tensor& t, int src,
                                int tag = 0) {
  LC_ASSIGN_OR_RETURN(std::unique_ptr<Work> work, comm.Recv(t, src, tag));
  return work->Wait();
}

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_DISTRIBUTED_RANK_TEST_UTIL_H_
