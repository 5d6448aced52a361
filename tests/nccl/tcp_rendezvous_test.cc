// The TCP rendezvous of the NCCL backend, without a GPU: ranks as threads
// exchanging a payload over 127.0.0.1, disagreements between ranks, ranks or
// a rank 0 that never appear (bounded by the timeout, no hang), and the
// launcher's environment variables.
#include "distributed/tcp_rendezvous.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// A port that nothing listens on right now: bound once to port 0, then
// released.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  const int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t length = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  close(fd);
  return ntohs(addr.sin_port);
}

// A socket listening on `port` of every interface (0: any free port).
int ListenOn(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  const int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  EXPECT_EQ(listen(fd, 8), 0);
  return fd;
}

RendezvousConfig Config(int rank, int world_size, int port,
                        milliseconds timeout = milliseconds(20000)) {
  RendezvousConfig config;
  config.rank = rank;
  config.world_size = world_size;
  config.master_addr = "127.0.0.1";
  config.master_port = port;
  config.timeout = timeout;
  return config;
}

// Runs ExchangeRendezvous for every config on its own thread.
std::vector<absl::StatusOr<std::string>> ExchangeAll(
    const std::vector<RendezvousConfig>& configs, const std::string& payload) {
  std::vector<absl::StatusOr<std::string>> results(
      configs.size(), absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < configs.size(); ++i) {
    threads.emplace_back([&, i] {
      results[i] = ExchangeRendezvous(
          configs[i], configs[i].rank == 0 ? payload : std::string());
    });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

TEST(RendezvousTest, EveryRankReceivesRankZerosPayload) {
  const int port = FreePort();
  // Binary bytes, as an NCCL unique id has.
  std::string payload(128, '\0');
  for (size_t i = 0; i < payload.size(); ++i)
    payload[i] = static_cast<char>(i * 7);
  std::vector<RendezvousConfig> configs;
  // The clients start first: they retry until rank 0 listens.
  for (int r = 4; r >= 0; --r) configs.push_back(Config(r, 5, port));
  const auto results = ExchangeAll(configs, payload);
  for (size_t i = 0; i < results.size(); ++i) {
    ASSERT_TRUE(results[i].ok())
        << "rank " << configs[i].rank << ": " << results[i].status();
    EXPECT_EQ(*results[i], payload) << "rank " << configs[i].rank;
  }
}

TEST(RendezvousTest, WorldSizeOneNeedsNoNetwork) {
  // Port 1 would need privileges to listen on: nothing is opened.
  const auto result = ExchangeRendezvous(Config(0, 1, 1), "id");
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(*result, "id");
}

TEST(RendezvousTest, RankZeroThatNeverAppearsIsADeadlineWithinTheTimeout) {
  const Clock::time_point start = Clock::now();
  const auto result =
      ExchangeRendezvous(Config(1, 2, FreePort(), milliseconds(300)), "");
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded)
      << result.status();
  EXPECT_TRUE(absl::StrContains(result.status().message(),
                                "could not connect to rank 0 at 127.0.0.1:"))
      << result.status();
  EXPECT_LT(SecondsSince(start), 5.0);
}

TEST(RendezvousTest, RankZeroThatAcceptsButNeverAnswersIsADeadline) {
  const int port = FreePort();
  const int listener = ListenOn(port);  // the kernel accepts; nobody replies
  const Clock::time_point start = Clock::now();
  const auto result =
      ExchangeRendezvous(Config(1, 2, port, milliseconds(300)), "");
  close(listener);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded)
      << result.status();
  EXPECT_TRUE(absl::StrContains(result.status().message(), "payload"))
      << result.status();
  EXPECT_LT(SecondsSince(start), 5.0);
}

TEST(RendezvousTest, RankThatNeverConnectsIsADeadlineOnRankZeroNamingIt) {
  const int port = FreePort();
  const Clock::time_point start = Clock::now();
  // World size 3, but rank 2 never comes.
  const auto results = ExchangeAll({Config(0, 3, port, milliseconds(1000)),
                                    Config(1, 3, port, milliseconds(1000))},
                                   "id");
  EXPECT_EQ(results[0].status().code(), absl::StatusCode::kDeadlineExceeded)
      << results[0].status();
  EXPECT_TRUE(absl::StrContains(results[0].status().message(), "rank(s) 2 "))
      << results[0].status();
  // Rank 1 was served before rank 0 gave up.
  ASSERT_TRUE(results[1].ok()) << results[1].status();
  EXPECT_EQ(*results[1], "id");
  EXPECT_LT(SecondsSince(start), 5.0);
}

TEST(RendezvousTest, DifferentWorldSizesAreRejectedOnBothSides) {
  const int port = FreePort();
  const auto results =
      ExchangeAll({Config(0, 2, port), Config(1, 3, port)}, "id");
  for (const auto& result : results) {
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument)
        << result.status();
    EXPECT_TRUE(absl::StrContains(
        result.status().message(),
        "rank 1 was started with WORLD_SIZE=3 but rank 0 with WORLD_SIZE=2"))
        << result.status();
  }
  EXPECT_TRUE(absl::StrContains(results[1].status().message(), "rejected"))
      << results[1].status();
}

TEST(RendezvousTest, TwoProcessesWithTheSameRankAreRejected) {
  const int port = FreePort();
  const auto results = ExchangeAll(
      {Config(0, 3, port), Config(1, 3, port), Config(1, 3, port)}, "id");
  EXPECT_EQ(results[0].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(results[0].status().message(),
                                "two processes claim RANK=1"))
      << results[0].status();
  // One of the two was served first; the other was told why it was not.
  const int served = results[1].ok() + results[2].ok();
  EXPECT_EQ(served, 1) << results[1].status() << " / " << results[2].status();
  for (int i : {1, 2}) {
    if (results[i].ok()) continue;
    EXPECT_EQ(results[i].status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(results[i].status().message(),
                                  "two processes claim RANK=1"))
        << results[i].status();
  }
}

TEST(RendezvousTest, StrayConnectionsAreIgnored) {
  const int port = FreePort();
  std::optional<absl::StatusOr<std::string>> rank0;
  std::thread server(
      [&] { rank0 = ExchangeRendezvous(Config(0, 2, port), "id"); });
  // Something that is not a rank connects, sends garbage and leaves.
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    const bool connected =
        connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    if (connected) {
      const char garbage[16] = "GET / HTTP/1.0\n";
      EXPECT_EQ(send(fd, garbage, sizeof(garbage), MSG_NOSIGNAL),
                static_cast<ssize_t>(sizeof(garbage)));
    }
    close(fd);
    if (connected) break;
    std::this_thread::sleep_for(milliseconds(10));
  }
  const auto rank1 = ExchangeRendezvous(Config(1, 2, port), "");
  server.join();
  ASSERT_TRUE(rank0.has_value());
  EXPECT_TRUE(rank0->ok()) << rank0->status();
  ASSERT_TRUE(rank1.ok()) << rank1.status();
  EXPECT_EQ(*rank1, "id");
}

TEST(RendezvousTest, PortInUseIsAClearErrorOnRankZero) {
  const int port = FreePort();
  const int blocker = ListenOn(port);
  const auto result = ExchangeRendezvous(Config(0, 2, port), "id");
  close(blocker);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable)
      << result.status();
  EXPECT_TRUE(
      absl::StrContains(result.status().message(),
                        "rank 0 cannot listen on port " + std::to_string(port)))
      << result.status();
}

TEST(RendezvousTest, BadConfigsAreInvalidArguments) {
  const auto expect_invalid = [](const RendezvousConfig& config,
                                 const std::string& fragment) {
    const auto result = ExchangeRendezvous(config, "id");
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument)
        << result.status();
    EXPECT_TRUE(absl::StrContains(result.status().message(), fragment))
        << result.status();
  };
  expect_invalid(Config(2, 2, 1234), "rank 2 is out of range for world size 2");
  expect_invalid(Config(0, 0, 1234), "out of range for world size 0");
  expect_invalid(Config(0, 2, 0), "port 0 is out of range");
  expect_invalid(Config(1, 2, 70000), "port 70000 is out of range");
  RendezvousConfig no_address = Config(1, 2, 1234);
  no_address.master_addr = "";
  expect_invalid(no_address, "master address is empty");
  expect_invalid(Config(1, 2, 1234, milliseconds(0)), "timeout 0 ms");
}

// Sets the launcher's variables for one test and restores them after.
class LaunchEnvironmentTest : public ::testing::Test {
 protected:
  static constexpr const char* kNames[] = {"RANK", "WORLD_SIZE", "MASTER_ADDR",
                                           "MASTER_PORT", "LOCAL_RANK"};

  void SetUp() override {
    for (const char* name : kNames) {
      if (const char* value = std::getenv(name)) saved_[name] = value;
      unsetenv(name);
    }
  }
  void TearDown() override {
    for (const char* name : kNames) {
      auto it = saved_.find(name);
      if (it == saved_.end()) {
        unsetenv(name);
      } else {
        setenv(name, it->second.c_str(), 1);
      }
    }
  }
  // Sets the four required variables to valid values.
  void SetValid() {
    setenv("RANK", "1", 1);
    setenv("WORLD_SIZE", "4", 1);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("MASTER_PORT", "29500", 1);
  }
  void ExpectInvalid(const std::string& fragment) {
    const auto env = ReadLaunchEnvironment(milliseconds(1000));
    EXPECT_EQ(env.status().code(), absl::StatusCode::kInvalidArgument)
        << env.status();
    EXPECT_TRUE(absl::StrContains(env.status().message(), fragment))
        << env.status();
  }

 private:
  std::map<std::string, std::string> saved_;
};

TEST_F(LaunchEnvironmentTest, ReadsTheVariablesLikeTorchrun) {
  SetValid();
  auto env = ReadLaunchEnvironment(milliseconds(1234));
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ(env->rendezvous.rank, 1);
  EXPECT_EQ(env->rendezvous.world_size, 4);
  EXPECT_EQ(env->rendezvous.master_addr, "127.0.0.1");
  EXPECT_EQ(env->rendezvous.master_port, 29500);
  EXPECT_EQ(env->rendezvous.timeout, milliseconds(1234));
  EXPECT_EQ(env->local_rank, 1);  // LOCAL_RANK defaults to RANK
  setenv("LOCAL_RANK", "0", 1);
  env = ReadLaunchEnvironment(milliseconds(1234));
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ(env->local_rank, 0);
}

TEST_F(LaunchEnvironmentTest, MissingVariablesAreNamed) {
  ExpectInvalid(
      "environment variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are "
      "not set");
  SetValid();
  unsetenv("MASTER_PORT");
  ExpectInvalid("environment variable MASTER_PORT is not set");
}

TEST_F(LaunchEnvironmentTest, BadValuesAreNamedWithTheirValue) {
  SetValid();
  setenv("RANK", "abc", 1);
  ExpectInvalid("environment variable RANK='abc' is not an integer");
  SetValid();
  setenv("RANK", "4", 1);
  ExpectInvalid(
      "environment variable RANK=4 is out of range (expected 0 <= RANK < "
      "WORLD_SIZE=4)");
  SetValid();
  setenv("WORLD_SIZE", "0", 1);
  ExpectInvalid("environment variable WORLD_SIZE=0 is out of range");
  SetValid();
  setenv("MASTER_PORT", "70000", 1);
  ExpectInvalid(
      "environment variable MASTER_PORT=70000 is out of range (expected a TCP "
      "port, 1..65535)");
  SetValid();
  setenv("MASTER_PORT", "http", 1);
  ExpectInvalid("environment variable MASTER_PORT='http' is not an integer");
  SetValid();
  setenv("MASTER_ADDR", "", 1);
  ExpectInvalid("environment variable MASTER_ADDR is empty");
  SetValid();
  setenv("LOCAL_RANK", "-1", 1);
  ExpectInvalid("environment variable LOCAL_RANK=-1 is out of range");
}

}  // namespace
}  // namespace lc
