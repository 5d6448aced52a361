// Benchmark of the CUDA attention kernels: forward and forward+backward time
// (median of --repeats runs after --warmup runs, CUDA events on the current
// stream, the host's plan building included), TFLOP/s and the peak extra
// device memory of lc::Attention on bfloat16 inputs:
//  - dilated: batch 1, --heads heads of head_dim 64, segment lengths
//    2048,4096,8192 with dilation rates 1,2,4 in head groups, at each of
//    --dilated_lengths;
//  - dense: one pattern w = n, r = 1, --dense_heads heads of head_dim 128 at
//    n = --dense_length, causal and not;
//  - ring: dense attention (not causal) of --ring_length tokens on k = 2 and
//    4 thread ranks of the one GPU: the forward time per ring step with the
//    K/V transfers (RingAttention) and without them (each rank running the
//    same steps as single-rank Attention of its queries over one chunk), so
//    the difference is the communication that compute does not hide.
//
// FLOPs count only the (query, key) pairs the pattern allows, with the
// FlashAttention convention: forward = 4 * head_dim * pairs (S = Q K^T and
// O = P V), backward = 2.5 x forward (the five products of the FA2 backward),
// so forward+backward = 14 * head_dim * pairs. (The kernels here recompute S
// and dP in both backward kernels, seven products, for determinism without
// atomics; the convention counts the useful work only.)
// Peak extra memory: the peak of the device's tensor bytes during the call
// minus the bytes held before it (q, k, v and the output gradient).
//
//   bazel run //attention:attention_cuda_benchmark -- --workloads=dense
//   bazel run //attention:attention_cuda_benchmark -- --workloads=ring
//
// Needs a CUDA device: without one it says so and exits 0.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "attention/attention_cuda.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/cli.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/status.h"
#include "core/tensor.h"
#include "distributed/thread_communicator.h"

ABSL_FLAG(std::vector<std::string>, workloads,
          std::vector<std::string>({"dilated", "dense"}),
          "Which workloads to run: dilated, dense, ring.");
ABSL_FLAG(std::vector<std::string>, dilated_lengths,
          std::vector<std::string>({"131072", "1048576"}),
          "Sequence lengths of the dilated workload.");
ABSL_FLAG(int64_t, heads, 12, "Heads of the dilated workload (head_dim 64).");
ABSL_FLAG(bool, dilated_causal, false, "Causal dilated attention.");
ABSL_FLAG(int64_t, dense_length, 16384, "Sequence length of the dense runs.");
ABSL_FLAG(int64_t, dense_heads, 16, "Heads of the dense runs (head_dim 128).");
ABSL_FLAG(int64_t, ring_length, 65536,
          "Sequence length of the ring workload (8 heads of head_dim 128).");
ABSL_FLAG(std::vector<std::string>, backends,
          std::vector<std::string>({"own", "cudnn"}),
          "Backends of the dilated and dense runs: own (our kernels), cudnn "
          "(cuDNN's fused attention) or auto.");
ABSL_FLAG(std::string, tensor_core_kernels, "auto",
          "Tensor-core kernels of the own backend: auto (wgmma on Hopper) or "
          "mma_sync (the kernels of earlier GPUs).");
ABSL_FLAG(int64_t, repeats, 5, "Timed runs per measurement (median shown).");
ABSL_FLAG(int64_t, warmup, 1, "Untimed runs before the timed ones.");
ABSL_FLAG(int, device, 0, "CUDA device index.");

namespace lc {
namespace {

constexpr char kName[] = "attention_cuda_benchmark";

[[noreturn]] void Fail(const std::string& message) {
  ExitWithError(kName, message);
}

// A bfloat16 tensor on `device` with values uniform in [-sqrt(3), sqrt(3))
// (unit variance) from a counter hash: fast for a billion elements, where
// the project's Randn (drawn on the host in float64) would take minutes.
Tensor RandomBf16(const Shape& shape, uint64_t seed, Device device) {
  Tensor host = Empty(shape, DType::kBFloat16);
  bfloat16* data = host.data<bfloat16>();
  const int64_t count = host.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
    data[i] = bfloat16((2.f * u - 1.f) * 1.7320508f);
  }
  return host.to(device);
}

// Allowed (t, u) pairs of all heads of one batch element: for each pattern
// and segment, c selected positions give c * c pairs (c (c + 1) / 2 when
// causal).
double UsefulPairs(const AttentionPattern& pattern, int64_t n, bool causal) {
  double pairs = 0;
  for (const auto& patterns : pattern.head_patterns) {
    for (const DilatedPattern& p : patterns) {
      for (int64_t begin = 0; begin < n; begin += p.segment_length) {
        const int64_t length = std::min(p.segment_length, n - begin);
        const double c =
            length > p.offset
                ? (length - p.offset + p.dilation_rate - 1) / p.dilation_rate
                : 0;
        pairs += causal ? c * (c + 1) / 2 : c * c;
      }
    }
  }
  return pairs;
}

struct Measurement {
  double ms = 0;          // median
  double peak_extra = 0;  // bytes
};

// Times fn (median of repeats after warmup runs) between CUDA events on the
// current stream, and the peak extra device memory of one run.
template <typename Fn>
Measurement Measure(Device device, Fn&& fn) {
  for (int64_t i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) fn();
  SynchronizeCudaStream(device.index);
  MemoryTracker& tracker = DeviceMemoryTracker(device);
  std::vector<double> ms;
  double peak_extra = 0;
  for (int64_t i = 0; i < std::max<int64_t>(1, absl::GetFlag(FLAGS_repeats));
       ++i) {
    tracker.Reset();
    const int64_t before = tracker.stats().current_bytes;
    CudaEvent start(device.index), stop(device.index);
    cudaStream_t stream = CurrentCudaStream(device);
    start.Record(stream);
    fn();
    stop.Record(stream);
    stop.Synchronize();
    ms.push_back(stop.ElapsedMsSince(start));
    peak_extra =
        std::max<double>(peak_extra, tracker.stats().peak_bytes - before);
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], peak_extra};
}

// "beyond results": the forward+backward peak extra minus the bytes of what
// the call returns (bfloat16 out, dq, dk, dv and float32 lse), i.e. the
// workspace.
void PrintRow(const std::string& name, int64_t n, int64_t heads, double pairs,
              int64_t head_dim, const Measurement& fwd,
              const Measurement& both) {
  const double fwd_flops = 4.0 * head_dim * pairs;
  const double results = 4.0 * n * heads * head_dim * 2 + 4.0 * n * heads;
  std::printf("%-36s %9lld %10.3f %8.1f %12.3f %8.1f %10.1f %10.1f\n",
              name.c_str(), static_cast<long long>(n), fwd.ms,
              fwd_flops / (fwd.ms * 1e9), both.ms,
              3.5 * fwd_flops / (both.ms * 1e9), both.peak_extra / (1 << 20),
              (both.peak_extra - results) / (1 << 20));
  std::fflush(stdout);
}

// Forward and forward+backward of one configuration on one backend.
void RunOn(const std::string& name, int64_t n, int64_t heads, int64_t head_dim,
           const AttentionPattern& pattern, bool causal,
           AttentionBackend backend, Device device) {
  const Shape shape = {1, n, heads, head_dim};
  const Tensor q = RandomBf16(shape, 1, device);
  const Tensor k = RandomBf16(shape, 2, device);
  const Tensor v = RandomBf16(shape, 3, device);
  const Tensor grad = RandomBf16(shape, 4, device);
  AttentionOptions options;
  options.causal = causal;
  options.backend = backend;
  const Measurement fwd = Measure(device, [&] {
    NoGradGuard no_grad;
    Attention(q, k, v, pattern, options);
  });
  const Measurement both = Measure(device, [&] {
    const Tensor qg = q.detach().set_requires_grad(true);
    const Tensor kg = k.detach().set_requires_grad(true);
    const Tensor vg = v.detach().set_requires_grad(true);
    Attention(qg, kg, vg, pattern, options).out.backward(grad);
  });
  PrintRow(name, n, heads, UsefulPairs(pattern, n, causal), head_dim, fwd,
           both);
}

// Forward and forward+backward of one configuration on each backend of
// --backends (a backend that cannot run it prints why).
void Run(const std::string& name, int64_t n, int64_t heads, int64_t head_dim,
         const AttentionPattern& pattern, bool causal, Device device) {
  for (const std::string& backend_name : absl::GetFlag(FLAGS_backends)) {
    const absl::StatusOr<AttentionBackend> backend =
        ForFlag("backends", ParseAttentionBackend(backend_name));
    if (!backend.ok()) Fail(std::string(backend.status().message()));
    const std::string label = absl::StrCat(name, " ", backend_name);
    const absl::Status status = StatusFromCall([&] {
      RunOn(label, n, heads, head_dim, pattern, causal, *backend, device);
    });
    if (!status.ok()) {
      std::printf("%-36s %9lld  %s\n", label.c_str(), static_cast<long long>(n),
                  status.ToString().c_str());
    }
  }
}

// Per ring step on k thread ranks of `device`: the forward of dense ring
// attention over n tokens (K/V travel) against each rank computing the same
// k steps without any transfer. Each time is the median over the repeats
// of the slowest rank (ranks start together after a barrier).
void RunRing(int64_t n, int64_t heads, int64_t head_dim, Device device) {
  for (int k : {2, 4}) {
    const int64_t local = n / k;
    std::vector<std::vector<double>> with(k), without(k);
    const absl::Status status = RunRanks(k, [&](Communicator& comm) {
      const int r = comm.rank();
      SetCudaDevice(device.index);
      const Shape shape = {1, local, heads, head_dim};
      const Tensor q = RandomBf16(shape, 10 * r + 1, device);
      const Tensor kk = RandomBf16(shape, 10 * r + 2, device);
      const Tensor v = RandomBf16(shape, 10 * r + 3, device);
      AttentionPattern whole, chunk;
      whole.head_patterns.assign(heads, {DensePattern(k * local)});
      chunk.head_patterns.assign(heads, {DensePattern(local)});
      const auto time = [&](const std::function<void()>& fn,
                            std::vector<double>* ms) -> absl::Status {
        const int64_t runs = absl::GetFlag(FLAGS_warmup) +
                             std::max<int64_t>(1, absl::GetFlag(FLAGS_repeats));
        for (int64_t i = 0; i < runs; ++i) {
          SynchronizeCudaStream(device.index);
          LC_RETURN_IF_ERROR(comm.Barrier());
          CudaEvent start(device.index), stop(device.index);
          start.Record(CurrentCudaStream(device));
          fn();
          stop.Record(CurrentCudaStream(device));
          stop.Synchronize();
          if (i >= absl::GetFlag(FLAGS_warmup)) {
            ms->push_back(stop.ElapsedMsSince(start) / k);
          }
        }
        return absl::OkStatus();
      };
      NoGradGuard no_grad;
      LC_RETURN_IF_ERROR(time(
          [&] { RingAttention(comm, q, kk, v, k * local, whole); }, &with[r]));
      return time(
          [&] {
            // Our kernels, as the ring's steps run them.
            AttentionOptions own;
            own.backend = AttentionBackend::kOwn;
            for (int s = 0; s < k; ++s) Attention(q, kk, v, chunk, own);
          },
          &without[r]);
    });
    if (!status.ok()) Fail(std::string(status.message()));
    // Per repeat, the slowest rank; then the median over repeats.
    const auto slowest = [&](const std::vector<std::vector<double>>& ms) {
      std::vector<double> worst(ms[0].size(), 0);
      for (const std::vector<double>& rank : ms) {
        for (size_t i = 0; i < worst.size(); ++i) {
          worst[i] = std::max(worst[i], rank[i]);
        }
      }
      std::sort(worst.begin(), worst.end());
      return worst[worst.size() / 2];
    };
    const double a = slowest(with), b = slowest(without);
    std::printf(
        "%-26s %9lld %14.3f %14.3f %9.2f\n",
        absl::StrCat("ring k=", k, " dense h", heads, " d", head_dim).c_str(),
        static_cast<long long>(k * local), a, b, a / b);
    std::fflush(stdout);
  }
}

int Main() {
  const std::string kernels = absl::GetFlag(FLAGS_tensor_core_kernels);
  if (kernels != "auto" && kernels != "mma_sync") {
    Fail(absl::StrCat("--tensor_core_kernels is \"", kernels,
                      "\" (expected auto or mma_sync)"));
  }
  SetCudaTensorCoreKernels(kernels == "auto" ? CudaTensorCoreKernels::kAuto
                                             : CudaTensorCoreKernels::kMmaSync);
  if (CudaDeviceCount() == 0) {
    std::printf(
        "attention_cuda_benchmark: no CUDA device; nothing to measure.\n");
    return 0;
  }
  const Device device = Device::Cuda(absl::GetFlag(FLAGS_device));
  SetCudaDevice(device.index);
  std::printf(
      "bfloat16; FLOPs: fwd 4*d*pairs, fwd+bwd 3.5x fwd (FlashAttention "
      "convention);\npeak extra: device bytes beyond q, k, v and the output "
      "gradient (fwd+bwd);\nbeyond res: that minus the results (out, lse, "
      "dq, dk, dv).\n\n");
  std::printf("%-36s %9s %10s %8s %12s %8s %10s %10s\n", "workload", "n",
              "fwd ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "extra MiB",
              "beyond res");
  for (const std::string& workload : absl::GetFlag(FLAGS_workloads)) {
    if (workload == "dilated") {
      const int64_t heads = absl::GetFlag(FLAGS_heads);
      DilatedOptions dilated;
      dilated.segment_lengths = {2048, 4096, 8192};
      dilated.dilation_rates = {1, 2, 4};
      absl::StatusOr<std::vector<std::vector<DilatedPattern>>> patterns =
          DilatedHeadPatterns(dilated, heads);
      if (!patterns.ok()) Fail(std::string(patterns.status().message()));
      AttentionPattern pattern;
      pattern.head_patterns = *patterns;
      const bool causal = absl::GetFlag(FLAGS_dilated_causal);
      for (int64_t n :
           PositiveIntegersOrExit(kName, "dilated_lengths",
                                  absl::GetFlag(FLAGS_dilated_lengths))) {
        Run(absl::StrCat("dilated h", heads, " d64", causal ? " causal" : ""),
            n, heads, 64, pattern, causal, device);
      }
    } else if (workload == "dense") {
      const int64_t n = absl::GetFlag(FLAGS_dense_length);
      const int64_t heads = absl::GetFlag(FLAGS_dense_heads);
      AttentionPattern pattern;
      pattern.head_patterns.assign(heads, {DensePattern(n)});
      for (bool causal : {false, true}) {
        Run(absl::StrCat("dense h", heads, " d128", causal ? " causal" : ""), n,
            heads, 128, pattern, causal, device);
      }
    } else if (workload == "ring") {
      std::printf("\n%-26s %9s %14s %14s %9s\n", "ring workload (forward)", "n",
                  "ms/step comm", "ms/step no comm", "ratio");
      RunRing(absl::GetFlag(FLAGS_ring_length), 8, 128, device);
    } else {
      Fail(absl::StrCat("--workloads has \"", workload,
                        "\" (expected dilated, dense or ring)"));
    }
  }
  return 0;
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return lc::Main();
}
