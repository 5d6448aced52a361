// Benchmark of a full training step on one GPU (issue 7, Performance,
// workload 3), the twin of train/pytorch_train_baseline.py: the same model
// (6 layers, d_model 512, 8 heads, vocab 256, LayerNorm, tied head, causal
// dilated attention with segments 2048,4096,8192 and rates 1,2,4 in head
// groups, no dropout), the same step (bfloat16 mixed precision with float32
// master weights, mean next-token cross-entropy over every position of one
// sequence of random bytes, clipping at global norm 1.0, AdamW with betas
// 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices, constant lr 3e-3) and
// the same figures:
//  - default: median time of --repeats steps after --warmup steps at
//    n = --n, without and with --recompute (CUDA events on the stream, the
//    host's work between kernels included); tokens/s; the peak tensor memory
//    over the timed steps (weights and optimizer state included, like
//    torch.cuda.max_memory_allocated) and the caching allocator's peak
//    reserve; the last loss.
//  - --max_context: for each of --lengths in turn, one step, without and with
//    recomputation, until the first that does not fit (the out-of-memory
//    lc::Error; the cache is emptied between tries): the longest n that
//    trains.
//
//   bazel run //train:train_benchmark -- --json=$PWD/train_bench.json
//   bazel run //train:train_benchmark -- --max_context
//
// Needs a CUDA device: without one it says so and exits 0.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "attention/attention_config.h"
#include "core/cli.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/random.h"
#include "core/status.h"
#include "models/transformer_lm.h"
#include "train/optimizer.h"
#include "train/trainer.h"

ABSL_FLAG(bool, max_context, false,
          "Find the longest n that trains (one step per length of --lengths) "
          "instead of timing steps at --n.");
ABSL_FLAG(int64_t, n, 65536, "Tokens per sequence of the timed steps.");
ABSL_FLAG(int64_t, warmup, 2, "Untimed steps before the timed ones.");
ABSL_FLAG(int64_t, repeats, 5, "Timed steps (the median is shown).");
ABSL_FLAG(std::vector<std::string>, lengths,
          std::vector<std::string>({"65536", "131072", "262144", "524288",
                                    "786432", "1048576", "2097152", "4194304"}),
          "--max_context: lengths tried in order, up to the first failure.");
ABSL_FLAG(std::vector<std::string>, recompute,
          std::vector<std::string>({"off", "on"}),
          "off, on or both: without and/or with recomputation of each block.");
ABSL_FLAG(int64_t, layers, 6, "Transformer blocks.");
ABSL_FLAG(int64_t, d_model, 512, "Model width.");
ABSL_FLAG(int64_t, heads, 8, "Attention heads.");
ABSL_FLAG(int64_t, vocab, 256, "Vocabulary size.");
ABSL_FLAG(int64_t, batch, 1, "Sequences per step.");
ABSL_FLAG(std::vector<std::string>, segment_lengths,
          std::vector<std::string>({"2048", "4096", "8192"}),
          "Dilated segment lengths.");
ABSL_FLAG(std::vector<std::string>, dilation_rates,
          std::vector<std::string>({"1", "2", "4"}), "Dilation rates.");
ABSL_FLAG(std::string, attention_backend, "auto",
          "Attention kernels: auto (cuDNN's fused attention where it applies), "
          "own or cudnn.");
ABSL_FLAG(std::string, dtype, "bfloat16",
          "Compute dtype: bfloat16 (mixed precision) or float32.");
ABSL_FLAG(double, lr, 3e-3, "Learning rate (constant).");
ABSL_FLAG(double, weight_decay, 0.01, "AdamW weight decay (matrices only).");
ABSL_FLAG(double, clip, 1.0, "Max global gradient norm (0: none).");
ABSL_FLAG(int, device, 0, "CUDA device index.");
ABSL_FLAG(std::string, json, "", "File to write every figure to (JSON).");

namespace lc {
namespace {

constexpr char kName[] = "train_benchmark";

[[noreturn]] void Fail(const std::string& message) {
  ExitWithError(kName, message);
}

std::vector<bool> ParseRecompute(const std::vector<std::string>& items) {
  std::vector<bool> values;
  for (const std::string& item : items) {
    if (item != "off" && item != "on") {
      Fail(absl::StrCat("--recompute has \"", item, "\" (expected off, on)"));
    }
    values.push_back(item == "on");
  }
  return values;
}

double GiB(int64_t bytes) { return bytes / double(int64_t{1} << 30); }

template <typename T>
T ValueOrThrow(absl::StatusOr<T> value) {
  ThrowIfError(value.status());
  return *std::move(value);
}

// The model of pytorch_train_baseline.py at context n.
TransformerConfig ModelConfig(int64_t n, bool recompute) {
  TransformerConfig m;
  m.vocab_size = absl::GetFlag(FLAGS_vocab);
  m.context = n;
  m.d_model = absl::GetFlag(FLAGS_d_model);
  m.num_layers = absl::GetFlag(FLAGS_layers);
  m.num_heads = absl::GetFlag(FLAGS_heads);
  m.recompute = recompute;
  m.attention.type = AttentionType::kDilated;
  m.attention.dilated.segment_lengths = PositiveIntegersOrExit(
      kName, "segment_lengths", absl::GetFlag(FLAGS_segment_lengths));
  m.attention.dilated.dilation_rates = PositiveIntegersOrExit(
      kName, "dilation_rates", absl::GetFlag(FLAGS_dilation_rates));
  m.attention.dilated.head_layout = HeadLayout::kHeadGroups;
  m.attention.causal = true;
  const absl::StatusOr<AttentionBackend> backend =
      ForFlag("attention_backend",
              ParseAttentionBackend(absl::GetFlag(FLAGS_attention_backend)));
  if (!backend.ok()) {
    ExitWithError(kName, std::string(backend.status().message()));
  }
  m.attention.backend = *backend;
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "bfloat16") {
    m.dtype = DType::kBFloat16;
  } else if (dtype == "float32") {
    m.dtype = DType::kFloat32;
  } else {
    Fail(absl::StrCat("--dtype=", dtype, " (expected bfloat16 or float32)"));
  }
  m.device = Device::Cuda(absl::GetFlag(FLAGS_device));
  return m;
}

// A model, its AdamW, and one batch of random bytes (tokens and their
// next-byte targets, on the CPU as the trainer's batches are).
struct Run {
  std::shared_ptr<TransformerLM> model;
  std::unique_ptr<AdamW> optimizer;
  std::vector<Tensor> params;
  Tensor tokens, targets;
};

// Builds `run` for context n (the model's weights as the trainer
// initializes them, seed 0).
void Build(Run& run, int64_t n, bool recompute) {
  const TransformerConfig config = ModelConfig(n, recompute);
  Generator init(0);
  run.model = ValueOrThrow(TransformerLM::Create(config, init));
  run.model->Train();
  run.params = run.model->Parameters();
  AdamWOptions options;
  options.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  run.optimizer = std::make_unique<AdamW>(
      ValueOrThrow(AdamW::Create(run.model->NamedParameters(), options)));
  const int64_t batch = absl::GetFlag(FLAGS_batch);
  Generator data(1);
  std::vector<double> bytes;
  for (double u : Rand({batch, n + 1}, data, DType::kFloat64).ToVector()) {
    bytes.push_back(std::min<double>(config.vocab_size - 1,
                                     std::floor(u * config.vocab_size)));
  }
  const Tensor all = FromVector(bytes, {batch, n + 1}, DType::kInt64);
  run.tokens = all.slice(1, 0, n).contiguous();
  run.targets = all.slice(1, 1, n + 1).contiguous();
}

// One training step (the trainer's); returns the loss.
double Step(Run& run) {
  const StepOutput step = ValueOrThrow(OptimizerStep(
      *run.model, *run.optimizer, run.params, run.tokens, run.targets,
      run.targets.numel(), absl::GetFlag(FLAGS_clip), absl::GetFlag(FLAGS_lr),
      /*comm=*/nullptr, /*sp=*/nullptr));
  return step.loss.item();
}

void ResetPeaks(int device) {
  SynchronizeCudaStream(device);
  DeviceMemoryTracker(Device::Cuda(device)).Reset();
  ResetCudaCachingAllocatorStats(device);
}

std::string Bench(int device) {
  const int64_t n = absl::GetFlag(FLAGS_n);
  const int64_t warmup = absl::GetFlag(FLAGS_warmup);
  const int64_t repeats = absl::GetFlag(FLAGS_repeats);
  const int64_t tokens = n * absl::GetFlag(FLAGS_batch);
  std::printf("median of %lld steps after %lld warm-up steps\n",
              static_cast<long long>(repeats), static_cast<long long>(warmup));
  std::printf("%9s %8s %9s %10s %8s %12s %7s\n", "recompute", "n", "ms/step",
              "tokens/s", "peak GiB", "reserved GiB", "loss");
  std::vector<std::string> rows;
  for (bool recompute : ParseRecompute(absl::GetFlag(FLAGS_recompute))) {
    Run run;
    Build(run, n, recompute);
    for (int64_t i = 0; i < warmup; ++i) Step(run);
    ResetPeaks(device);
    const cudaStream_t stream = CurrentCudaStream(device);
    std::vector<double> ms;
    double loss = 0;
    for (int64_t i = 0; i < repeats; ++i) {
      CudaEvent start(device), end(device);
      start.Record(stream);
      loss = Step(run);
      end.Record(stream);
      end.Synchronize();
      ms.push_back(end.ElapsedMsSince(start));
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[sorted.size() / 2];
    const int64_t peak = DeviceMemoryStats(Device::Cuda(device)).peak_bytes;
    const int64_t reserved =
        CudaCachingAllocatorStats(device).peak_reserved_bytes;
    int64_t parameters = 0;
    for (const Tensor& p : run.params) parameters += p.numel();
    std::printf("%9s %8lld %9.2f %10.4g %8.2f %12.2f %7.3f\n",
                recompute ? "True" : "False", static_cast<long long>(n), median,
                tokens / (median / 1e3), GiB(peak), GiB(reserved), loss);
    std::fflush(stdout);
    rows.push_back(absl::StrFormat(
        "{\"recompute\": %s, \"n\": %d, \"ms_per_step\": %.6g, \"step_ms\": "
        "[%s], \"tokens_per_s\": %.6g, \"peak_bytes\": %d, "
        "\"peak_reserved_bytes\": %d, \"parameters\": %d, \"loss\": %.6g}",
        recompute ? "true" : "false", n, median, absl::StrJoin(ms, ", "),
        tokens / (median / 1e3), peak, reserved, parameters, loss));
    run = Run();
    EmptyCudaCache();
  }
  return absl::StrCat("\"warmup\": ", warmup, ", \"repeats\": ", repeats,
                      ", \"bench\": [", absl::StrJoin(rows, ", "), "]");
}

std::string MaxContext(int device) {
  const std::vector<int64_t> lengths =
      PositiveIntegersOrExit(kName, "lengths", absl::GetFlag(FLAGS_lengths));
  std::printf("%9s %8s %-14s %8s %7s\n", "recompute", "n", "result", "peak GiB",
              "seconds");
  std::vector<std::string> results;
  for (bool recompute : ParseRecompute(absl::GetFlag(FLAGS_recompute))) {
    std::vector<std::string> tries;
    int64_t largest = 0;
    for (int64_t n : lengths) {
      const auto started = std::chrono::steady_clock::now();
      ResetPeaks(device);
      std::string note;
      bool ok = false;
      {
        Run run;  // a fresh model per length, freed before the next
        const absl::Status status = StatusFromCall([&] {
          Build(run, n, recompute);
          note = absl::StrFormat("loss %.3f", Step(run));
          SynchronizeCudaStream(device);
        });
        ok = status.ok();
        if (status.code() == absl::StatusCode::kResourceExhausted) {
          note = "out of memory";
        } else if (!ok) {
          note = absl::StrCat("error: ", status.message().substr(0, 300));
        }
      }
      EmptyCudaCache();
      const int64_t peak = DeviceMemoryStats(Device::Cuda(device)).peak_bytes;
      const double seconds = std::chrono::duration<double>(
                                 std::chrono::steady_clock::now() - started)
                                 .count();
      std::printf("%9s %8lld %-14.60s %8.2f %7.1f\n",
                  recompute ? "True" : "False", static_cast<long long>(n),
                  note.c_str(), GiB(peak), seconds);
      std::fflush(stdout);
      tries.push_back(absl::StrFormat(
          "{\"n\": %d, \"ok\": %s, \"note\": \"%s\", \"peak_bytes\": %d, "
          "\"seconds\": %.3f}",
          n, ok ? "true" : "false", absl::CEscape(note), peak, seconds));
      if (!ok) break;
      largest = n;
    }
    std::printf("recompute=%s: longest n that trained: %lld\n",
                recompute ? "True" : "False", static_cast<long long>(largest));
    results.push_back(absl::StrFormat(
        "{\"recompute\": %s, \"largest_n\": %d, \"tries\": [%s]}",
        recompute ? "true" : "false", largest, absl::StrJoin(tries, ", ")));
  }
  return absl::StrCat("\"max_context\": [", absl::StrJoin(results, ", "), "]");
}

int Main() {
  if (CudaDeviceCount() == 0) {
    std::printf(
        "train_benchmark: no CUDA device on this machine; nothing to "
        "measure (run it on a GPU machine)\n");
    return 0;
  }
  const int device = absl::GetFlag(FLAGS_device);
  if (device < 0 || device >= CudaDeviceCount()) {
    Fail(absl::StrCat("--device=", device, " (this machine has ",
                      CudaDeviceCount(), " CUDA devices)"));
  }
  SetCudaDevice(device);
  cudaDeviceProp props;
  LC_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
  const TransformerConfig config = ModelConfig(absl::GetFlag(FLAGS_n), false);
  std::printf(
      "longctx on %s: %lld layers, d_model %lld, %lld heads, vocab %lld, "
      "batch %lld, causal dilated attention segments %s rates %s (head "
      "groups, attention backend %s), %s, fused AdamW, clip %g\n",
      props.name, static_cast<long long>(config.num_layers),
      static_cast<long long>(config.d_model),
      static_cast<long long>(config.num_heads),
      static_cast<long long>(config.vocab_size),
      static_cast<long long>(absl::GetFlag(FLAGS_batch)),
      absl::StrJoin(config.attention.dilated.segment_lengths, ",").c_str(),
      absl::StrJoin(config.attention.dilated.dilation_rates, ",").c_str(),
      absl::GetFlag(FLAGS_attention_backend).c_str(),
      config.dtype == DType::kBFloat16 ? "bfloat16 mixed precision" : "float32",
      absl::GetFlag(FLAGS_clip));
  const auto started = std::chrono::steady_clock::now();
  const bool max_context = absl::GetFlag(FLAGS_max_context);
  const std::string figures = max_context ? MaxContext(device) : Bench(device);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count();
  std::printf("%s took %.1f s\n", max_context ? "max_context" : "bench",
              seconds);
  const std::string path = absl::GetFlag(FLAGS_json);
  if (!path.empty()) {
    std::ofstream out(path);
    out << absl::StrFormat(
        "{\"device\": \"%s\", \"memory_bytes\": %d, \"mode\": \"%s\", "
        "\"model\": {\"layers\": %d, \"d_model\": %d, \"heads\": %d, "
        "\"vocab\": %d, \"batch\": %d, \"segment_lengths\": [%s], "
        "\"dilation_rates\": [%s], \"dtype\": \"%s\", \"lr\": %g, "
        "\"weight_decay\": %g, \"clip\": %g}, %s, \"seconds\": %.3f}\n",
        absl::CEscape(props.name), static_cast<int64_t>(props.totalGlobalMem),
        max_context ? "max_context" : "bench", config.num_layers,
        config.d_model, config.num_heads, config.vocab_size,
        absl::GetFlag(FLAGS_batch),
        absl::StrJoin(config.attention.dilated.segment_lengths, ", "),
        absl::StrJoin(config.attention.dilated.dilation_rates, ", "),
        DTypeName(config.dtype), absl::GetFlag(FLAGS_lr),
        absl::GetFlag(FLAGS_weight_decay), absl::GetFlag(FLAGS_clip), figures,
        seconds);
    if (!out) Fail(absl::StrCat("cannot write --json=", path));
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times a training step of the toy LM on one GPU (issue 7, workload 3), "
      "or finds the longest context it trains at (--max_context).");
  absl::ParseCommandLine(argc, argv);
  try {
    return lc::Main();
  } catch (const lc::Error& e) {
    lc::Fail(std::string(e.status().message()));
  }
}
