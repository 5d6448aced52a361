#include "distributed/tcp_rendezvous.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status.h"

namespace lc {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kMagic = 0x4c435256;  // "LCRV"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kStatusOk = 0;
constexpr uint32_t kStatusRejected = 1;
constexpr uint64_t kMaxPayloadBytes = uint64_t{1} << 20;
constexpr size_t kHelloBytes = 16;
constexpr size_t kReplyHeaderBytes = 16;
constexpr size_t kAckBytes = 4;
// A client waits this long between connection attempts.
constexpr std::chrono::milliseconds kConnectRetryDelay{50};

std::string ErrnoText(int err) { return std::generic_category().message(err); }

void PutU32(uint32_t value, uint8_t* out) {
  for (int i = 0; i < 4; ++i)
    out[i] = static_cast<uint8_t>(value >> (24 - 8 * i));
}
void PutU64(uint64_t value, uint8_t* out) {
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<uint8_t>(value >> (56 - 8 * i));
}
uint32_t GetU32(const uint8_t* in) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value = (value << 8) | in[i];
  return value;
}
uint64_t GetU64(const uint8_t* in) {
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value = (value << 8) | in[i];
  return value;
}

// Owns a file descriptor.
class Socket {
 public:
  explicit Socket(int fd = -1) : fd_(fd) {}
  Socket(Socket&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Socket& operator=(Socket&& other) noexcept {
    if (this != &other) {
      Close();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket() { Close(); }

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }

 private:
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  int fd_;
};

// Milliseconds left until `deadline`, rounded up, at least 0.
int RemainingMs(Clock::time_point deadline) {
  const auto left =
      std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::max<int64_t>(0, left.count()));
}

// Waits until `fd` is ready for `events`: true when ready, false when the
// deadline passed first.
absl::StatusOr<bool> WaitReady(int fd, short events,
                               Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int n = poll(&p, 1, RemainingMs(deadline));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat("poll: ", ErrnoText(errno)));
    }
    if (Clock::now() >= deadline) return false;
  }
}

// Reads exactly `size` bytes. `what` names the peer for the error message.
absl::Status ReadFull(int fd, void* data, size_t size,
                      Clock::time_point deadline, const std::string& what) {
  auto* out = static_cast<uint8_t*>(data);
  size_t done = 0;
  while (done < size) {
    LC_ASSIGN_OR_RETURN(const bool ready, WaitReady(fd, POLLIN, deadline));
    if (!ready) {
      return absl::DeadlineExceededError(
          absl::StrCat("timed out waiting for ", what));
    }
    const ssize_t n = recv(fd, out + done, size - done, 0);
    if (n == 0) {
      return absl::UnavailableError(
          absl::StrCat("connection closed while waiting for ", what));
    }
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return absl::UnavailableError(absl::StrCat(
          "receive failed while waiting for ", what, ": ", ErrnoText(errno)));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status WriteFull(int fd, const void* data, size_t size,
                       Clock::time_point deadline, const std::string& what) {
  const auto* in = static_cast<const uint8_t*>(data);
  size_t done = 0;
  while (done < size) {
    LC_ASSIGN_OR_RETURN(const bool ready, WaitReady(fd, POLLOUT, deadline));
    if (!ready) {
      return absl::DeadlineExceededError(
          absl::StrCat("timed out sending ", what));
    }
    const ssize_t n = send(fd, in + done, size - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return absl::UnavailableError(
          absl::StrCat("sending ", what, " failed: ", ErrnoText(errno)));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status WriteReply(int fd, uint32_t status, const std::string& body,
                        Clock::time_point deadline, const std::string& what) {
  std::string message(kReplyHeaderBytes, '\0');
  auto* header = reinterpret_cast<uint8_t*>(&message[0]);
  PutU32(kMagic, header);
  PutU32(status, header + 4);
  PutU64(body.size(), header + 8);
  message += body;
  return WriteFull(fd, message.data(), message.size(), deadline, what);
}

// A non-blocking socket listening on `port` of every interface: IPv6
// dual-stack where the host has IPv6, IPv4 otherwise.
absl::StatusOr<Socket> Listen(int port, int backlog) {
  int last_error = 0;
  for (const int family : {AF_INET6, AF_INET}) {
    Socket s(socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!s.valid()) {
      last_error = errno;
      continue;
    }
    const int on = 1;
    const int off = 0;
    setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    int bound;
    if (family == AF_INET6) {
      setsockopt(s.fd(), IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
      sockaddr_in6 addr{};
      addr.sin6_family = AF_INET6;
      addr.sin6_addr = in6addr_any;
      addr.sin6_port = htons(static_cast<uint16_t>(port));
      bound = bind(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    } else {
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_ANY);
      addr.sin_port = htons(static_cast<uint16_t>(port));
      bound = bind(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    }
    if (bound != 0 || listen(s.fd(), backlog) != 0) {
      last_error = errno;
      continue;
    }
    return s;
  }
  return absl::UnavailableError(absl::StrCat(
      "rendezvous: rank 0 cannot listen on port ", port, ": ",
      ErrnoText(last_error), " (is MASTER_PORT taken by another process?)"));
}

std::string MissingRanks(const std::vector<bool>& served) {
  std::vector<int> missing;
  for (int r = 0; r < static_cast<int>(served.size()); ++r) {
    if (!served[r]) missing.push_back(r);
  }
  return absl::StrJoin(missing, ", ");
}

// Rank 0: serves the payload to ranks 1..world_size-1.
absl::StatusOr<std::string> Serve(const RendezvousConfig& config,
                                  const std::string& payload,
                                  Clock::time_point deadline) {
  LC_ASSIGN_OR_RETURN(Socket listener,
                      Listen(config.master_port, config.world_size));
  std::vector<bool> served(config.world_size, false);
  served[0] = true;
  int waiting = config.world_size - 1;
  const auto timed_out = [&] {
    return absl::DeadlineExceededError(absl::StrCat(
        "rendezvous: rank 0 waited ", config.timeout.count(), " ms on port ",
        config.master_port, " for WORLD_SIZE=", config.world_size,
        " ranks, but rank(s) ", MissingRanks(served),
        " did not complete the exchange (not started, or started with a "
        "different MASTER_ADDR or MASTER_PORT?)"));
  };
  while (waiting > 0) {
    LC_ASSIGN_OR_RETURN(const bool ready,
                        WaitReady(listener.fd(), POLLIN, deadline));
    if (!ready) return timed_out();
    Socket conn(
        accept4(listener.fd(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!conn.valid()) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK ||
          errno == ECONNABORTED) {
        continue;
      }
      return absl::UnavailableError(
          absl::StrCat("rendezvous: rank 0 accept: ", ErrnoText(errno)));
    }
    uint8_t hello[kHelloBytes];
    const absl::Status read =
        ReadFull(conn.fd(), hello, sizeof(hello), deadline, "a peer's hello");
    if (absl::IsDeadlineExceeded(read)) return timed_out();
    // A connection that hangs up or does not speak the protocol is not one of
    // the ranks (they retry only before connecting): ignore it.
    if (!read.ok() || GetU32(hello) != kMagic) continue;
    const uint32_t version = GetU32(hello + 4);
    const int rank = static_cast<int>(GetU32(hello + 8));
    const int world_size = static_cast<int>(GetU32(hello + 12));
    std::string rejection;
    if (version != kVersion) {
      rejection = absl::StrCat("rank ", rank, " speaks rendezvous version ",
                               version, ", rank 0 version ", kVersion);
    } else if (world_size != config.world_size) {
      rejection = absl::StrCat(
          "rank ", rank, " was started with WORLD_SIZE=", world_size,
          " but rank 0 with WORLD_SIZE=", config.world_size);
    } else if (rank < 1 || rank >= config.world_size) {
      rejection = absl::StrCat("a process claims RANK=", rank, ", outside 1..",
                               config.world_size - 1,
                               " for WORLD_SIZE=", config.world_size);
    } else if (served[rank]) {
      rejection = absl::StrCat("two processes claim RANK=", rank);
    }
    if (!rejection.empty()) {
      // Best effort: the peer learns why; the error is rank 0's either way.
      WriteReply(conn.fd(), kStatusRejected, rejection, deadline,
                 "the rejection")
          .IgnoreError();
      return absl::InvalidArgumentError(
          absl::StrCat("rendezvous: ", rejection));
    }
    const std::string peer = absl::StrCat("rank ", rank);
    absl::Status status = WriteReply(conn.fd(), kStatusOk, payload, deadline,
                                     absl::StrCat("the payload to ", peer));
    uint8_t ack[kAckBytes];
    if (status.ok()) {
      status = ReadFull(conn.fd(), ack, sizeof(ack), deadline,
                        absl::StrCat("the acknowledgement of ", peer));
    }
    if (status.ok() && GetU32(ack) != kMagic) {
      status = absl::UnavailableError(
          absl::StrCat(peer, " sent a malformed acknowledgement"));
    }
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat("rendezvous: rank 0: ",
                                                      status.message()));
    }
    served[rank] = true;
    --waiting;
  }
  return payload;
}

// Connects to rank 0, retrying until the deadline.
absl::StatusOr<Socket> Connect(const RendezvousConfig& config,
                               const std::string& where,
                               Clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  const std::string port = absl::StrCat(config.master_port);
  const int resolved =
      getaddrinfo(config.master_addr.c_str(), port.c_str(), &hints, &addresses);
  if (resolved != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous: cannot resolve MASTER_ADDR='",
                     config.master_addr, "': ", gai_strerror(resolved)));
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> owned(addresses,
                                                           freeaddrinfo);
  int last_error = 0;
  for (;;) {
    for (const addrinfo* a = addresses; a != nullptr; a = a->ai_next) {
      Socket s(socket(a->ai_family,
                      a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                      a->ai_protocol));
      if (!s.valid()) {
        last_error = errno;
        continue;
      }
      if (connect(s.fd(), a->ai_addr, a->ai_addrlen) == 0) return s;
      if (errno != EINPROGRESS) {
        last_error = errno;
        continue;
      }
      LC_ASSIGN_OR_RETURN(const bool ready,
                          WaitReady(s.fd(), POLLOUT, deadline));
      if (!ready) {
        last_error = ETIMEDOUT;
        continue;
      }
      int error = 0;
      socklen_t length = sizeof(error);
      getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &error, &length);
      if (error == 0) return s;
      last_error = error;
    }
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) break;
    std::this_thread::sleep_for(
        std::min<Clock::duration>(left, kConnectRetryDelay));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "rendezvous: rank ", config.rank, " could not connect to rank 0 at ",
      where, " within ", config.timeout.count(),
      " ms (last error: ", ErrnoText(last_error),
      "); is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?"));
}

// Ranks 1..world_size-1: fetches the payload from rank 0.
absl::StatusOr<std::string> Fetch(const RendezvousConfig& config,
                                  Clock::time_point deadline) {
  const std::string where =
      absl::StrCat(config.master_addr, ":", config.master_port);
  LC_ASSIGN_OR_RETURN(Socket conn, Connect(config, where, deadline));
  const std::string from = absl::StrCat("rank 0 at ", where);
  const auto with_context = [&](const absl::Status& status) {
    return absl::Status(
        status.code(),
        absl::StrCat("rendezvous: rank ", config.rank, ": ", status.message()));
  };
  uint8_t hello[kHelloBytes];
  PutU32(kMagic, hello);
  PutU32(kVersion, hello + 4);
  PutU32(static_cast<uint32_t>(config.rank), hello + 8);
  PutU32(static_cast<uint32_t>(config.world_size), hello + 12);
  absl::Status status = WriteFull(conn.fd(), hello, sizeof(hello), deadline,
                                  absl::StrCat("the hello to ", from));
  if (!status.ok()) return with_context(status);

  uint8_t header[kReplyHeaderBytes];
  status = ReadFull(conn.fd(), header, sizeof(header), deadline,
                    absl::StrCat("the payload from ", from));
  if (!status.ok()) return with_context(status);
  const uint64_t length = GetU64(header + 8);
  if (GetU32(header) != kMagic || length > kMaxPayloadBytes) {
    return absl::UnavailableError(
        absl::StrCat("rendezvous: rank ", config.rank, ": ", from,
                     " is not a rendezvous server (malformed reply)"));
  }
  std::string body(length, '\0');
  status = ReadFull(conn.fd(), &body[0], body.size(), deadline,
                    absl::StrCat("the payload from ", from));
  if (!status.ok()) return with_context(status);
  if (GetU32(header + 4) != kStatusOk) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rendezvous: ", from, " rejected rank ", config.rank, ": ", body));
  }
  uint8_t ack[kAckBytes];
  PutU32(kMagic, ack);
  status = WriteFull(conn.fd(), ack, sizeof(ack), deadline,
                     absl::StrCat("the acknowledgement to ", from));
  if (!status.ok()) return with_context(status);
  return body;
}

// The value of environment variable `name` as an int in [min, max];
// `range` describes the range for the error message.
absl::StatusOr<int> IntVariable(const char* name, int min, int max,
                                const std::string& range) {
  const char* text = std::getenv(name);
  int value = 0;
  if (!absl::SimpleAtoi(text, &value)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "environment variable ", name, "='", text, "' is not an integer"));
  }
  if (value < min || value > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, "=", value,
                     " is out of range (expected ", range, ")"));
  }
  return value;
}

}  // namespace

absl::StatusOr<LaunchEnvironment> ReadLaunchEnvironment(
    std::chrono::milliseconds timeout) {
  std::vector<std::string> missing;
  for (const char* name :
       {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
    if (std::getenv(name) == nullptr) missing.push_back(name);
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "environment variable", missing.size() > 1 ? "s " : " ",
        absl::StrJoin(missing, ", "), missing.size() > 1 ? " are" : " is",
        " not set (a launcher such as torchrun sets RANK, WORLD_SIZE, "
        "MASTER_ADDR and MASTER_PORT for every process)"));
  }
  LaunchEnvironment env;
  RendezvousConfig& config = env.rendezvous;
  config.timeout = timeout;
  LC_ASSIGN_OR_RETURN(config.world_size,
                      IntVariable("WORLD_SIZE", 1, INT32_MAX, ">= 1"));
  LC_ASSIGN_OR_RETURN(
      config.rank,
      IntVariable("RANK", 0, config.world_size - 1,
                  absl::StrCat("0 <= RANK < WORLD_SIZE=", config.world_size)));
  config.master_addr = std::getenv("MASTER_ADDR");
  if (config.master_addr.empty()) {
    return absl::InvalidArgumentError(
        "environment variable MASTER_ADDR is empty (expected the host name or "
        "address of rank 0)");
  }
  LC_ASSIGN_OR_RETURN(config.master_port, IntVariable("MASTER_PORT", 1, 65535,
                                                      "a TCP port, 1..65535"));
  env.local_rank = config.rank;
  if (std::getenv("LOCAL_RANK") != nullptr) {
    LC_ASSIGN_OR_RETURN(env.local_rank,
                        IntVariable("LOCAL_RANK", 0, INT32_MAX, ">= 0"));
  }
  return env;
}

absl::StatusOr<std::string> ExchangeRendezvous(
    const RendezvousConfig& config, const std::string& payload_from_rank0) {
  if (config.world_size < 1 || config.rank < 0 ||
      config.rank >= config.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rendezvous: rank ", config.rank, " is out of range for world size ",
        config.world_size, " (expected 0 <= rank < world size)"));
  }
  if (config.master_port < 1 || config.master_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous: port ", config.master_port,
                     " is out of range (expected 1..65535)"));
  }
  if (config.master_addr.empty()) {
    return absl::InvalidArgumentError(
        "rendezvous: the master address is empty");
  }
  if (config.timeout <= std::chrono::milliseconds::zero()) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous: timeout ",
                                                   config.timeout.count(),
                                                   " ms must be positive"));
  }
  if (config.rank == 0 && payload_from_rank0.size() > kMaxPayloadBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous: the payload has ", payload_from_rank0.size(),
                     " bytes (at most ", kMaxPayloadBytes, ")"));
  }
  const Clock::time_point deadline = Clock::now() + config.timeout;
  if (config.rank == 0) {
    if (config.world_size == 1) return payload_from_rank0;
    return Serve(config, payload_from_rank0, deadline);
  }
  return Fetch(config, deadline);
}

}  // namespace lc
