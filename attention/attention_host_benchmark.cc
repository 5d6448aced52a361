// Benchmark of the host time of one attention call in the steady state (the
// planning, uploads and host waits a layer's call does on every training
// step; a layer keeps one AttentionPlan, made on its first call), on
// bfloat16 CUDA inputs with our kernels:
//  - dilated: batch 1, 8 heads of head_dim 64, segment lengths
//    2048,4096,8192 with dilation rates 1,2,4, causal, n = --length;
//  - block_sparse: the same heads, a local window of 512 tokens in blocks
//    of 128, causal, n = --length;
//  - ring: ring_dilated as above on 4 thread ranks of the one GPU, n =
//    --length (each rank holds n / 4 tokens), the slowest rank shown.
// The plan is made once (its time shown: what every call paid before plans
// were kept). Each repeat (after --warmup untimed calls) synchronizes the
// device, then times on the host: the forward call (until it returns), the
// backward call (out.backward(grad) until it returns) and the whole until the
// device is done. With no per-call planning and no host waits the two host
// columns stay small (the kernels are queued, not run) whatever the length; a
// host wait shows as host time close to the device's. Medians over --repeats.
//
//   bazel run //attention:attention_host_benchmark -- --length=1048576
//
// Needs a CUDA device: without one it says so and exits 0.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "attention/attention_config.h"
#include "core/autograd.h"
#include "core/cli.h"
#include "core/cuda.h"
#include "core/status.h"
#include "core/tensor.h"
#include "distributed/thread_communicator.h"

ABSL_FLAG(int64_t, length, 1048576, "Sequence length of every workload.");
ABSL_FLAG(int64_t, repeats, 5, "Timed calls per workload (median shown).");
ABSL_FLAG(int64_t, warmup, 2, "Untimed calls before the timed ones.");
ABSL_FLAG(int, device, 0, "CUDA device index.");

namespace lc {
namespace {

constexpr char kName[] = "attention_host_benchmark";
constexpr int64_t kHeads = 8;
constexpr int64_t kHeadDim = 64;
constexpr int kRingRanks = 4;

using Clock = std::chrono::steady_clock;

double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

struct Times {
  double plan = 0;      // ms to make the plan (once per shape)
  double forward = 0;   // host ms until the forward call returned
  double backward = 0;  // host ms until the backward call returned
  double total = 0;     // ms until the device finished both
};

Times Median(std::vector<Times> runs) {
  Times m;
  const auto pick = [&](double Times::*field) {
    std::sort(runs.begin(), runs.end(), [&](const Times& a, const Times& b) {
      return a.*field < b.*field;
    });
    m.*field = runs[runs.size() / 2].*field;
  };
  pick(&Times::plan);
  pick(&Times::forward);
  pick(&Times::backward);
  pick(&Times::total);
  return m;
}

AttentionConfig ConfigOf(AttentionType type) {
  AttentionConfig config;
  config.type = type;
  config.causal = true;
  config.backend = AttentionBackend::kOwn;
  config.dilated.segment_lengths = {2048, 4096, 8192};
  config.dilated.dilation_rates = {1, 2, 4};
  if (type == AttentionType::kBlockSparse) {
    config.dilated = DilatedOptions();
    config.block_sparse.pattern = SparsePattern::kLocalWindow;
    config.block_sparse.block_size = 128;
    config.block_sparse.window = 512;
  }
  if (type == AttentionType::kRingDilated) config.ranks = kRingRanks;
  return config;
}

// Times one layer's attention call of `config` on this thread's tokens
// ([1, local, heads, head_dim] bfloat16 on `device`): `runs` calls after
// the warm-up, forward then backward, each repeat starting from an idle
// device.
std::vector<Times> TimeCalls(const AttentionConfig& config, int64_t local,
                             const SequenceParallelContext* sp, Device device,
                             uint64_t seed, const std::function<void()>& sync) {
  const Shape shape = {1, local, kHeads, kHeadDim};
  const auto random = [&](uint64_t s) {
    Generator gen(seed * 16 + s);
    return Randn(shape, gen, DType::kFloat32).to(DType::kBFloat16).to(device);
  };
  const Tensor q = random(1), k = random(2), v = random(3), grad = random(4);
  // As a layer does (multihead_attention.h): one plan for every call.
  sync();
  const Clock::time_point planning = Clock::now();
  const std::shared_ptr<const AttentionPlan> plan =
      MakeAttentionPlan(config, SpecOf(q), /*training=*/true, sp);
  const double plan_ms = MsBetween(planning, Clock::now());
  std::vector<Times> times;
  const int64_t warmup = absl::GetFlag(FLAGS_warmup);
  const int64_t repeats = std::max<int64_t>(1, absl::GetFlag(FLAGS_repeats));
  for (int64_t i = 0; i < warmup + repeats; ++i) {
    const Tensor qg = q.detach().set_requires_grad(true);
    const Tensor kg = k.detach().set_requires_grad(true);
    const Tensor vg = v.detach().set_requires_grad(true);
    SynchronizeCudaStream(device.index);
    sync();
    const Clock::time_point start = Clock::now();
    const AttentionResult r = plan->Run(qg, kg, vg);
    const Clock::time_point forward = Clock::now();
    r.out.backward(grad);
    const Clock::time_point backward = Clock::now();
    SynchronizeCudaStream(device.index);
    const Clock::time_point done = Clock::now();
    if (i >= warmup) {
      times.push_back({plan_ms, MsBetween(start, forward),
                       MsBetween(forward, backward), MsBetween(start, done)});
    }
  }
  return times;
}

void PrintRow(const std::string& name, int64_t n, const Times& t) {
  std::printf("%-28s %9lld %12.3f %12.3f %12.3f %12.3f\n", name.c_str(),
              static_cast<long long>(n), t.plan, t.forward, t.backward,
              t.total);
  std::fflush(stdout);
}

void RunSingle(AttentionType type, int64_t n, Device device) {
  const std::vector<Times> times =
      TimeCalls(ConfigOf(type), n, nullptr, device, 1, [] {});
  PrintRow(AttentionTypeName(type), n, Median(times));
}

void RunRing(int64_t n, Device device) {
  const AttentionConfig config = ConfigOf(AttentionType::kRingDilated);
  std::vector<std::vector<Times>> per_rank(kRingRanks);
  const absl::Status status = RunRanks(kRingRanks, [&](Communicator& comm) {
    SetCudaDevice(device.index);
    SequenceParallelContext sp;
    sp.comm = &comm;
    sp.n = n;
    absl::Status barrier;
    per_rank[comm.rank()] = TimeCalls(
        config, RankTokenCount(n, kRingRanks, comm.rank(), config.layout), &sp,
        device, 1 + comm.rank(), [&] {
          const absl::Status s = comm.Barrier();
          if (barrier.ok()) barrier = s;
        });
    return barrier;
  });
  if (!status.ok()) ExitWithError(kName, std::string(status.message()));
  // Per repeat, the slowest rank in each column.
  std::vector<Times> slowest(per_rank[0].size());
  for (const std::vector<Times>& rank : per_rank) {
    for (size_t i = 0; i < slowest.size(); ++i) {
      slowest[i].plan = std::max(slowest[i].plan, rank[i].plan);
      slowest[i].forward = std::max(slowest[i].forward, rank[i].forward);
      slowest[i].backward = std::max(slowest[i].backward, rank[i].backward);
      slowest[i].total = std::max(slowest[i].total, rank[i].total);
    }
  }
  PrintRow("ring_dilated k=4", n, Median(slowest));
}

int Main() {
  if (CudaDeviceCount() == 0) {
    std::printf("%s: no CUDA device; nothing to measure.\n", kName);
    return 0;
  }
  const Device device = Device::Cuda(absl::GetFlag(FLAGS_device));
  SetCudaDevice(device.index);
  const int64_t n = absl::GetFlag(FLAGS_length);
  if (n < kRingRanks) {
    ExitWithError(kName, "--length " + std::to_string(n) + " (expected >= 4)");
  }
  std::printf(
      "bfloat16, %lld heads of head_dim %lld, causal, our kernels; host ms "
      "until each call returns, total ms until the device is done "
      "(medians)\n\n",
      static_cast<long long>(kHeads), static_cast<long long>(kHeadDim));
  std::printf("%-28s %9s %12s %12s %12s %12s\n", "workload", "n", "plan ms",
              "host fwd ms", "host bwd ms", "total ms");
  RunSingle(AttentionType::kDilated, n, device);
  RunSingle(AttentionType::kBlockSparse, n, device);
  RunRing(n, device);
  return 0;
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return lc::Main();
}
