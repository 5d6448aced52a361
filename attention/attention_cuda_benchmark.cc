// Benchmark of the CUDA attention kernels on bfloat16 inputs, batch 1. Each
// workload is an AttentionConfig, built into its pattern as attention_cli and
// //train build theirs (BuildAttentionPattern), and prints one table:
//  - dilated: --heads heads of head_dim 64, segment lengths 2048,4096,8192
//    with dilation rates 1,2,4 in head groups, at each of --dilated_lengths,
//    on each backend of --backends;
//  - all_heads: the same segments and rates in the LongNet all-heads layout
//    (every head has all three patterns, offsets head mod r), on our kernels
//    (cuDNN runs one pattern per head); its ps/pair against the dilated
//    rows' is the cost of the layout;
//  - dense: one pattern w = n, r = 1, --dense_heads heads of head_dim 128 at
//    n = --dense_length, on each backend of --backends;
//  - block_sparse: --block_sparse_heads heads of --block_sparse_head_dim at
//    n = --block_sparse_length under three block masks (MakeBlockMask):
//    local_window with blocks of 64 and window 256, local_window with blocks
//    of 128 and window 1024, random with blocks of 128, density 0.1 and seed
//    0; on our kernels (cuDNN takes no block mask);
//  - ring: dense attention (not causal) of --ring_length tokens, 8 heads of
//    head_dim 128, on k = 2 and 4 thread ranks of the one GPU: the forward
//    time per ring step with the K/V transfers (RingAttention) and without
//    them (each rank running the same steps as single-rank Attention of its
//    queries over one chunk), so the difference is the communication that
//    compute does not hide;
//  - ring_dilated: the dilated workload, causal, at each of
//    --dilated_lengths, on k = 2 and 4 thread ranks of the one GPU in the
//    zigzag layout: forward and forward+backward time per call against one
//    rank running the same call over all n tokens, both on our kernels with
//    their plans made once (as a layer keeps them). The ranks share the GPU,
//    so the ratio is what the ring adds to the same work (target: 1.15).
// The single-rank workloads (dilated, all_heads, dense, block_sparse) run
// each of --causal (default causal and not) on one set of random inputs, and
// time lc::Attention with the host's plan building included in each call.
//
// Times: the median of --repeats runs after --warmup runs, between CUDA
// events on the current stream; on thread ranks (which start each run
// together after a barrier) the median over the runs of the slowest rank.
// FLOPs count only the (query, key) pairs the pattern allows (a pair counted
// once per pattern of its head that allows it; under a block mask, exactly
// the pairs of its blocks that are on, causal within the diagonal blocks),
// with the FlashAttention convention: forward = 4 * head_dim * pairs
// (S = Q K^T and O = P V), backward = 2.5 x forward (the five products of
// the FA2 backward), so forward+backward = 14 * head_dim * pairs. (The
// kernels here recompute S and dP in both backward kernels, seven products,
// for determinism without atomics; the convention counts the useful work
// only.) ps/pair: picoseconds per allowed pair, summed over heads, which
// compares layouts and masks of different head_dim and density.
// Peak extra memory: the peak of the device's tensor bytes during the call
// minus the bytes held before it (q, k, v and the output gradient).
//
//   bazel run //attention:attention_cuda_benchmark  # dilated, dense
//   bazel run //attention:attention_cuda_benchmark --
//       --workloads=all_heads,block_sparse
//   bazel run //attention:attention_cuda_benchmark --
//       --workloads=ring,ring_dilated
//   bazel run //attention:attention_cuda_benchmark --
//       --workloads= --dump_block_masks=/tmp/block_masks
// (each on one line). The last writes the block_sparse masks, needing no
// GPU, for attention/pytorch_flex_baseline.py --block_masks=/tmp/block_masks.
//
// Needs a CUDA device for any workload: without one it says so and exits 0
// (after writing --dump_block_masks).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "attention/attention_cuda.h"
#include "attention/attention_plan.h"
#include "attention/pattern.h"
#include "attention/ring_attention.h"
#include "core/autograd.h"
#include "core/cli.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/status.h"
#include "core/tensor.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"

ABSL_FLAG(std::vector<std::string>, workloads,
          std::vector<std::string>({"dilated", "dense"}),
          "Which workloads to run: dilated, all_heads, dense, block_sparse, "
          "ring, ring_dilated.");
ABSL_FLAG(std::vector<std::string>, dilated_lengths,
          std::vector<std::string>({"131072", "1048576"}),
          "Sequence lengths of the dilated, all_heads and ring_dilated "
          "workloads.");
ABSL_FLAG(int64_t, heads, 12,
          "Heads of the dilated, all_heads and ring_dilated workloads "
          "(head_dim 64).");
ABSL_FLAG(std::string, causal, "both",
          "Causal variants of the dilated, all_heads, dense and block_sparse "
          "workloads: both, true or false.");
ABSL_FLAG(int64_t, dense_length, 16384, "Sequence length of the dense runs.");
ABSL_FLAG(int64_t, dense_heads, 16, "Heads of the dense runs (head_dim 128).");
ABSL_FLAG(int64_t, block_sparse_length, 131072,
          "Sequence length of the block_sparse workload.");
ABSL_FLAG(int64_t, block_sparse_heads, 8, "Heads of the block_sparse runs.");
ABSL_FLAG(int64_t, block_sparse_head_dim, 64,
          "Head dim of the block_sparse runs.");
ABSL_FLAG(std::string, dump_block_masks, "",
          "A folder to write the block_sparse workload's masks at "
          "--block_sparse_length to, for attention/pytorch_flex_baseline.py "
          "(before any workload runs; needs no GPU).");
ABSL_FLAG(int64_t, ring_length, 65536,
          "Sequence length of the ring workload (8 heads of head_dim 128).");
ABSL_FLAG(std::vector<std::string>, backends,
          std::vector<std::string>({"own", "cudnn"}),
          "Backends of the dilated and dense runs: own (our kernels), cudnn "
          "(cuDNN's fused attention) or auto.");
ABSL_FLAG(std::string, tensor_core_kernels, "mma_sync",
          "Tensor-core kernels of the own backend: mma_sync or wgmma "
          "(Hopper's, on compute capability 9.0; CudaTensorCoreKernels).");
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

// The inputs of one configuration: q, k, v and the output gradient, each
// [1, n, heads, head_dim] bfloat16.
struct Inputs {
  Tensor q, k, v, grad;
};

Inputs RandomInputs(int64_t n, int64_t heads, int64_t head_dim, uint64_t seed,
                    Device device) {
  const Shape shape = {1, n, heads, head_dim};
  return {
      RandomBf16(shape, seed + 1, device), RandomBf16(shape, seed + 2, device),
      RandomBf16(shape, seed + 3, device), RandomBf16(shape, seed + 4, device)};
}

// Allowed (t, u) pairs of one head under a block mask alone: an on pair of
// blocks of sq and sk tokens gives sq * sk pairs; when causal, those left of
// the diagonal the same, a diagonal block of s tokens s (s + 1) / 2, and
// those right of it none.
double BlockMaskPairs(const BlockMask& mask, int64_t n, bool causal) {
  const int64_t bs = mask.block_size();
  const auto size = [&](int64_t block) {
    return static_cast<double>(std::min(bs, n - block * bs));
  };
  double pairs = 0;
  for (int64_t q = 0; q < mask.num_blocks(); ++q) {
    for (const int32_t k : mask.Row(q)) {
      if (!causal || k < q) {
        pairs += size(q) * size(k);
      } else if (k == q) {
        pairs += size(q) * (size(q) + 1) / 2;
      }
    }
  }
  return pairs;
}

// Allowed (t, u) pairs of all heads of one batch element: for each pattern
// and segment, c selected positions give c * c pairs (c (c + 1) / 2 when
// causal); a head under a block mask (the dense heads of a block-sparse
// config) gives BlockMaskPairs.
double UsefulPairs(const AttentionPattern& pattern, int64_t n, bool causal) {
  const double mask_pairs = pattern.block_mask != nullptr
                                ? BlockMaskPairs(*pattern.block_mask, n, causal)
                                : 0;
  double pairs = 0;
  for (const auto& patterns : pattern.head_patterns) {
    for (const DilatedPattern& p : patterns) {
      if (pattern.block_mask != nullptr) {
        if (p.segment_length < n || p.dilation_rate != 1) {
          Fail("pairs of a block mask over dilated patterns are not counted");
        }
        pairs += mask_pairs;
        continue;
      }
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
  std::vector<double> ms;  // each timed run
  double peak_extra = 0;   // bytes, the largest of the timed runs
};

double Median(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Per timed run, the slowest rank's time; then the median over the runs.
double SlowestMedian(const std::vector<std::vector<double>>& per_rank) {
  std::vector<double> worst(per_rank[0].size(), 0);
  for (const std::vector<double>& rank : per_rank) {
    for (size_t i = 0; i < worst.size(); ++i) {
      worst[i] = std::max(worst[i], rank[i]);
    }
  }
  return Median(worst);
}

// Times fn between CUDA events on the current stream: --warmup untimed runs,
// then --repeats timed ones, each after align() (thread ranks pass a barrier,
// so that they start together), and the peak extra device memory of a run
// (meaningless where ranks share the device).
Measurement Measure(
    Device device, const std::function<void()>& fn,
    const std::function<void()>& align = [] {}) {
  for (int64_t i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) fn();
  SynchronizeCudaStream(device.index);
  MemoryTracker& tracker = DeviceMemoryTracker(device);
  Measurement m;
  for (int64_t i = 0; i < std::max<int64_t>(1, absl::GetFlag(FLAGS_repeats));
       ++i) {
    align();
    tracker.Reset();
    const int64_t before = tracker.stats().current_bytes;
    CudaEvent start(device.index), stop(device.index);
    cudaStream_t stream = CurrentCudaStream(device);
    start.Record(stream);
    fn();
    stop.Record(stream);
    stop.Synchronize();
    m.ms.push_back(stop.ElapsedMsSince(start));
    m.peak_extra =
        std::max<double>(m.peak_extra, tracker.stats().peak_bytes - before);
  }
  return m;
}

using AttentionCall =
    std::function<AttentionResult(const Tensor&, const Tensor&, const Tensor&)>;

struct Passes {
  Measurement forward;  // without autograd
  Measurement both;     // forward and backward of inputs.grad
};

// The forward and forward+backward of `call` on `inputs`, each by Measure.
Passes MeasurePasses(
    const AttentionCall& call, const Inputs& inputs, Device device,
    const std::function<void()>& align = [] {}) {
  Passes passes;
  passes.forward = Measure(
      device,
      [&] {
        NoGradGuard no_grad;
        call(inputs.q, inputs.k, inputs.v);
      },
      align);
  passes.both = Measure(
      device,
      [&] {
        const Tensor q = inputs.q.detach().set_requires_grad(true);
        const Tensor k = inputs.k.detach().set_requires_grad(true);
        const Tensor v = inputs.v.detach().set_requires_grad(true);
        call(q, k, v).out.backward(inputs.grad);
      },
      align);
  return passes;
}

// The header of a single-rank workload's table.
void PrintHeader() {
  std::printf("\n%-42s %9s %10s %8s %12s %8s %11s %11s %10s %10s\n", "workload",
              "n", "fwd ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "fwd ps/pair",
              "f+b ps/pair", "extra MiB", "beyond res");
}

// "beyond res": the forward+backward peak extra minus the bytes of what
// the call returns (bfloat16 out, dq, dk, dv and float32 lse), i.e. the
// workspace.
void PrintRow(const std::string& name, const Shape& shape, double pairs,
              const Passes& passes) {
  const int64_t n = shape[1], heads = shape[2], head_dim = shape[3];
  const double fwd_ms = Median(passes.forward.ms);
  const double both_ms = Median(passes.both.ms);
  const double fwd_flops = 4.0 * head_dim * pairs;
  const double results = 4.0 * n * heads * head_dim * 2 + 4.0 * n * heads;
  std::printf(
      "%-42s %9lld %10.3f %8.1f %12.3f %8.1f %11.3f %11.3f %10.1f %10.1f\n",
      name.c_str(), static_cast<long long>(n), fwd_ms,
      fwd_flops / (fwd_ms * 1e9), both_ms, 3.5 * fwd_flops / (both_ms * 1e9),
      fwd_ms * 1e9 / pairs, both_ms * 1e9 / pairs,
      passes.both.peak_extra / (1 << 20),
      (passes.both.peak_extra - results) / (1 << 20));
  std::fflush(stdout);
}

// A row of the ring tables: for each (ring, baseline) pair of times, both
// and their ratio.
void PrintRingRow(const std::string& name, int64_t n,
                  std::initializer_list<std::pair<double, double>> times) {
  std::printf("%-42s %9lld", name.c_str(), static_cast<long long>(n));
  for (const auto& [ring, baseline] : times) {
    std::printf(" %12.3f %12.3f %7.3f", ring, baseline, ring / baseline);
  }
  std::printf("\n");
  std::fflush(stdout);
}

std::vector<bool> CausalVariants() {
  const std::string causal = absl::GetFlag(FLAGS_causal);
  if (causal == "both") return {false, true};
  if (causal == "true") return {true};
  if (causal == "false") return {false};
  Fail(absl::StrCat("--causal is \"", causal,
                    "\" (expected both, true or false)"));
}

AttentionBackend BackendOrExit(const std::string& name) {
  const absl::StatusOr<AttentionBackend> backend =
      ForFlag("backends", ParseAttentionBackend(name));
  if (!backend.ok()) Fail(std::string(backend.status().message()));
  return *backend;
}

// For each variant of --causal and each of `backends`: the forward and
// forward+backward of `config` (its causal and backend set here) on one set
// of random inputs [1, n, heads, head_dim]. A backend that cannot run a
// configuration prints why.
void RunSingle(const std::string& name, const AttentionConfig& config,
               int64_t n, int64_t heads, int64_t head_dim,
               const std::vector<std::string>& backends, Device device) {
  const absl::StatusOr<AttentionPattern> pattern =
      BuildAttentionPattern(config, heads, n);
  if (!pattern.ok()) Fail(std::string(pattern.status().message()));
  const Inputs inputs = RandomInputs(n, heads, head_dim, 0, device);
  for (bool causal : CausalVariants()) {
    for (const std::string& backend : backends) {
      AttentionConfig variant = config;
      variant.causal = causal;
      variant.backend = BackendOrExit(backend);
      const AttentionOptions options =
          MakeAttentionOptions(variant, /*training=*/false);
      const std::string label =
          absl::StrCat(name, causal ? " causal " : " ", backend);
      const absl::Status status = StatusFromCall([&] {
        const Passes passes = MeasurePasses(
            [&](const Tensor& q, const Tensor& k, const Tensor& v) {
              return Attention(q, k, v, *pattern, options);
            },
            inputs, device);
        PrintRow(label, inputs.q.shape(), UsefulPairs(*pattern, n, causal),
                 passes);
      });
      if (!status.ok()) {
        std::printf("%-42s %9lld  %s\n", label.c_str(),
                    static_cast<long long>(n), status.ToString().c_str());
        std::fflush(stdout);
      }
    }
  }
}

// The dilated workload's configuration: segments 2048,4096,8192 with rates
// 1,2,4 in `layout`.
AttentionConfig DilatedConfig(HeadLayout layout) {
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {2048, 4096, 8192};
  config.dilated.dilation_rates = {1, 2, 4};
  config.dilated.head_layout = layout;
  return config;
}

std::vector<int64_t> DilatedLengths() {
  return PositiveIntegersOrExit(kName, "dilated_lengths",
                                absl::GetFlag(FLAGS_dilated_lengths));
}

void RunDilatedLayout(const std::string& name, HeadLayout layout,
                      const std::vector<std::string>& backends, Device device) {
  PrintHeader();
  const int64_t heads = absl::GetFlag(FLAGS_heads);
  for (int64_t n : DilatedLengths()) {
    RunSingle(absl::StrCat(name, " h", heads, " d64"), DilatedConfig(layout), n,
              heads, 64, backends, device);
  }
}

void RunDilated(Device device) {
  RunDilatedLayout("dilated", HeadLayout::kHeadGroups,
                   absl::GetFlag(FLAGS_backends), device);
}

void RunAllHeads(Device device) {
  RunDilatedLayout("all_heads", HeadLayout::kAllHeads, {"own"}, device);
}

void RunDense(Device device) {
  PrintHeader();
  const int64_t heads = absl::GetFlag(FLAGS_dense_heads);
  AttentionConfig config;
  config.type = AttentionType::kDense;
  RunSingle(absl::StrCat("dense h", heads, " d128"), config,
            absl::GetFlag(FLAGS_dense_length), heads, 128,
            absl::GetFlag(FLAGS_backends), device);
}

struct SparseMask {
  std::string name;
  AttentionConfig config;  // block_sparse
};

// The block_sparse workload's masks.
std::vector<SparseMask> SparseMasks() {
  AttentionConfig local64;
  local64.type = AttentionType::kBlockSparse;
  local64.block_sparse.pattern = SparsePattern::kLocalWindow;
  local64.block_sparse.block_size = 64;
  local64.block_sparse.window = 256;
  AttentionConfig local128 = local64;
  local128.block_sparse.block_size = 128;
  local128.block_sparse.window = 1024;
  AttentionConfig random = local128;
  random.block_sparse.pattern = SparsePattern::kRandom;
  random.block_sparse.density = 0.1;
  random.block_sparse.seed = 0;
  return {{"local_b64_w256", local64},
          {"local_b128_w1024", local128},
          {"random_b128_d0.1", random}};
}

void RunBlockSparse(Device device) {
  PrintHeader();
  const int64_t n = absl::GetFlag(FLAGS_block_sparse_length);
  const int64_t heads = absl::GetFlag(FLAGS_block_sparse_heads);
  const int64_t head_dim = absl::GetFlag(FLAGS_block_sparse_head_dim);
  for (const SparseMask& mask : SparseMasks()) {
    RunSingle(absl::StrCat("sparse ", mask.name, " h", heads, " d", head_dim),
              mask.config, n, heads, head_dim, {"own"}, device);
  }
}

// Writes each block_sparse mask at --block_sparse_length tokens to
// dir/<name>.blockmask: one text line "longctx_block_mask name=NAME n=N
// block_size=B blocks=M pairs=P causal_pairs=C" (P and C: the allowed pairs
// of one head, not causal and causal), then the M * M bytes (0 or 1) of the
// mask, row-major [query block, key block]. attention/pytorch_flex_baseline.py
// reads them, so that FlexAttention runs exactly these masks.
void DumpBlockMasks(const std::string& dir) {
  const int64_t n = absl::GetFlag(FLAGS_block_sparse_length);
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error)
    Fail(absl::StrCat("--dump_block_masks: ", dir, ": ", error.message()));
  for (const SparseMask& mask : SparseMasks()) {
    const absl::StatusOr<AttentionPattern> pattern =
        BuildAttentionPattern(mask.config, 1, n);
    if (!pattern.ok()) Fail(std::string(pattern.status().message()));
    const BlockMask& block_mask = *pattern->block_mask;
    const std::vector<uint8_t> dense = block_mask.ToDense();  // [M, M]
    const std::string path = absl::StrCat(dir, "/", mask.name, ".blockmask");
    std::ofstream out(path, std::ios::binary);
    out << absl::StrCat(
        "longctx_block_mask name=", mask.name, " n=", n,
        " block_size=", block_mask.block_size(),
        " blocks=", block_mask.num_blocks(),
        " pairs=", static_cast<int64_t>(BlockMaskPairs(block_mask, n, false)),
        " causal_pairs=",
        static_cast<int64_t>(BlockMaskPairs(block_mask, n, true)), "\n");
    out.write(reinterpret_cast<const char*>(dense.data()), dense.size());
    out.close();
    if (!out) Fail(absl::StrCat("--dump_block_masks: could not write ", path));
    std::printf("wrote %s (%lld x %lld blocks, density %.4f)\n", path.c_str(),
                static_cast<long long>(block_mask.num_blocks()),
                static_cast<long long>(block_mask.num_blocks()),
                block_mask.Density());
  }
  std::fflush(stdout);
}

// Per ring step on k thread ranks of `device`: the forward of dense ring
// attention over n tokens (K/V travel) against each rank computing the same
// k steps without any transfer.
void RunRing(Device device) {
  std::printf("\n%-42s %9s %12s %12s %7s\n",
              "ring workload (forward ms per step)", "n", "comm", "no comm",
              "ratio");
  const int64_t n = absl::GetFlag(FLAGS_ring_length);
  const int64_t heads = 8, head_dim = 128;
  for (int k : {2, 4}) {
    const int64_t local = n / k;
    std::vector<std::vector<double>> with(k), without(k);
    const absl::Status status = RunRanks(k, [&](Communicator& comm) {
      const int r = comm.rank();
      SetCudaDevice(device.index);
      const Inputs in = RandomInputs(local, heads, head_dim, 10 * r, device);
      AttentionPattern whole, chunk;
      whole.head_patterns.assign(heads, {DensePattern(k * local)});
      chunk.head_patterns.assign(heads, {DensePattern(local)});
      const auto barrier = [&] { ThrowIfError(comm.Barrier()); };
      const auto ring = [&] {
        RingAttention(comm, in.q, in.k, in.v, k * local, whole);
      };
      // Our kernels, as the ring's steps run them, without the transfers.
      AttentionOptions own;
      own.backend = AttentionBackend::kOwn;
      const auto steps = [&] {
        for (int s = 0; s < k; ++s) Attention(in.q, in.k, in.v, chunk, own);
      };
      NoGradGuard no_grad;
      with[r] = Measure(device, ring, barrier).ms;
      without[r] = Measure(device, steps, barrier).ms;
      return absl::OkStatus();
    });
    if (!status.ok()) Fail(std::string(status.message()));
    PrintRingRow(absl::StrCat("ring k=", k, " dense h", heads, " d", head_dim),
                 k * local,
                 {{SlowestMedian(with) / k, SlowestMedian(without) / k}});
  }
}

// One call of `plan`.
AttentionCall PlanCall(std::shared_ptr<const AttentionPlan> plan) {
  return [plan](const Tensor& q, const Tensor& k, const Tensor& v) {
    return plan->Run(q, k, v);
  };
}

// Causal dilated attention per call on k thread ranks of `device` in the
// zigzag layout against one rank running the same call over all n tokens.
void RunRingDilated(Device device) {
  std::printf("\n%-42s %9s %12s %12s %7s %12s %12s %7s\n",
              "ring workload (ms per call)", "n", "fwd ring", "fwd 1 rank",
              "ratio", "f+b ring", "f+b 1 rank", "ratio");
  const int64_t heads = absl::GetFlag(FLAGS_heads);
  for (int64_t n : DilatedLengths()) {
    AttentionConfig config = DilatedConfig(HeadLayout::kHeadGroups);
    config.causal = true;
    config.backend = AttentionBackend::kOwn;
    Passes one_rank;
    {
      const Inputs in = RandomInputs(n, heads, 64, 0, device);
      const std::shared_ptr<const AttentionPlan> plan =
          MakeAttentionPlan(config, SpecOf(in.q), /*training=*/false);
      one_rank = MeasurePasses(PlanCall(plan), in, device);
    }
    config.type = AttentionType::kRingDilated;
    config.layout = SequenceLayout::kZigzag;
    for (int ranks : {2, 4}) {
      config.ranks = ranks;
      std::vector<std::vector<double>> forward(ranks), both(ranks);
      const absl::Status status = RunRanks(ranks, [&](Communicator& comm) {
        const int r = comm.rank();
        SetCudaDevice(device.index);
        const Inputs in =
            RandomInputs(RankTokenCount(n, ranks, r, config.layout), heads, 64,
                         10 * r, device);
        SequenceParallelContext sp;
        sp.comm = &comm;
        sp.n = n;
        const std::shared_ptr<const AttentionPlan> plan =
            MakeAttentionPlan(config, SpecOf(in.q), /*training=*/false, &sp);
        const Passes passes = MeasurePasses(
            PlanCall(plan), in, device, [&] { ThrowIfError(comm.Barrier()); });
        forward[r] = passes.forward.ms;
        both[r] = passes.both.ms;
        return absl::OkStatus();
      });
      if (!status.ok()) Fail(std::string(status.message()));
      PrintRingRow(absl::StrCat("ring k=", ranks, " dilated h", heads,
                                " d64 causal zigzag"),
                   n,
                   {{SlowestMedian(forward), Median(one_rank.forward.ms)},
                    {SlowestMedian(both), Median(one_rank.both.ms)}});
    }
  }
}

struct Workload {
  const char* name;
  void (*run)(Device);
};

constexpr Workload kWorkloads[] = {
    {"dilated", RunDilated}, {"all_heads", RunAllHeads},
    {"dense", RunDense},     {"block_sparse", RunBlockSparse},
    {"ring", RunRing},       {"ring_dilated", RunRingDilated},
};

const Workload& WorkloadOrExit(const std::string& name) {
  for (const Workload& workload : kWorkloads) {
    if (name == workload.name) return workload;
  }
  Fail(absl::StrCat("--workloads has \"", name,
                    "\" (expected dilated, all_heads, dense, block_sparse, "
                    "ring or ring_dilated)"));
}

int Main() {
  const std::string kernels = absl::GetFlag(FLAGS_tensor_core_kernels);
  if (kernels != "mma_sync" && kernels != "wgmma") {
    Fail(absl::StrCat("--tensor_core_kernels is \"", kernels,
                      "\" (expected mma_sync or wgmma)"));
  }
  SetCudaTensorCoreKernels(kernels == "wgmma"
                               ? CudaTensorCoreKernels::kWgmma
                               : CudaTensorCoreKernels::kMmaSync);
  std::vector<const Workload*> workloads;
  for (const std::string& name : absl::GetFlag(FLAGS_workloads)) {
    workloads.push_back(&WorkloadOrExit(name));
  }
  CausalVariants();  // checks --causal
  const std::string dump = absl::GetFlag(FLAGS_dump_block_masks);
  if (!dump.empty()) DumpBlockMasks(UserPath(dump));
  if (workloads.empty()) return 0;
  if (CudaDeviceCount() == 0) {
    std::printf(
        "attention_cuda_benchmark: no CUDA device; nothing to measure.\n");
    return 0;
  }
  const Device device = Device::Cuda(absl::GetFlag(FLAGS_device));
  SetCudaDevice(device.index);
  std::printf(
      "bfloat16; FLOPs: fwd 4*d*pairs, fwd+bwd 3.5x fwd (FlashAttention "
      "convention); ps/pair: time per allowed (query, key) pair of all "
      "heads;\npeak extra: device bytes beyond q, k, v and the output "
      "gradient (fwd+bwd);\nbeyond res: that minus the results (out, lse, "
      "dq, dk, dv).\n");
  for (const Workload* workload : workloads) {
    const absl::Status status = StatusFromCall([&] { workload->run(device); });
    if (!status.ok()) {
      Fail(absl::StrCat(workload->name, ": ", status.ToString()));
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
