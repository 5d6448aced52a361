// attention_cli: runs one attention layer (dense, dilated or block-sparse) on
// q, k, v read from a safetensors file and writes out, lse and, when the file
// holds grad_out, the gradients of q, k and v, for interop with and checks
// against other implementations (Python's safetensors and torch):
//
//   bazel run //attention:attention_cli -- --input=in.safetensors
//       --output=out.safetensors --pattern=dilated
//       --segment_lengths=2048,4096 --dilation_rates=1,2 --causal
//       [--window_left=1024 --window_right=0 --softcap=30]
//
// Every error (bad flag, file or tensor) prints one line to stderr and exits
// with status 1.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "attention/attention_config.h"
#include "core/autograd.h"
#include "core/cli.h"
#include "core/cuda.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "core/tensor.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"

ABSL_FLAG(std::string, input, "",
          "Required. safetensors file holding q, k, v [batch, n, heads, "
          "head_dim] (float32 or float64) and optionally grad_out (the shape "
          "of out, i.e. of q).");
ABSL_FLAG(std::string, output, "",
          "Required. safetensors file to write: out [batch, n, heads, "
          "head_dim], lse [batch, heads, n] (-inf where a query has no key), "
          "grad_q, grad_k, grad_v when the input holds grad_out, and "
          "block_mask (uint8 [query blocks, key blocks]) for block-sparse "
          "patterns.");
ABSL_FLAG(std::string, pattern, "dilated",
          "Attention type: dense, dilated, block_sparse, or their "
          "sequence-parallel forms ring_dilated and ring_block_sparse.");
ABSL_FLAG(std::string, segment_lengths, "",
          "Comma-separated segment lengths w_0,...,w_{G-1}. Empty: "
          "2048,4096,8192 for dilated patterns (the dilated-attention-pytorch "
          "README example); for block_sparse, a non-empty list intersects the "
          "block mask with these dilated patterns.");
ABSL_FLAG(std::string, dilation_rates, "",
          "Comma-separated dilation rates r_0,...,r_{G-1}, one per segment "
          "length. Empty: 1,2,4 for dilated patterns.");
ABSL_FLAG(std::string, head_layout, "head_groups",
          "How heads get the dilated patterns: head_groups (heads split into "
          "one group per pattern, as in dilated-attention-pytorch) or "
          "all_heads (every head has every pattern, as in the LongNet paper).");
ABSL_FLAG(bool, causal, false, "Causal attention: query t sees keys u <= t.");
ABSL_FLAG(int64_t, window_left, -1,
          "Sliding window (FlashAttention's window_size): query t sees keys u "
          ">= t - window_left, intersected with the pattern; -1: unlimited.");
ABSL_FLAG(int64_t, window_right, -1,
          "Sliding window: query t sees keys u <= t + window_right; -1: "
          "unlimited.");
ABSL_FLAG(std::optional<double>, softcap, std::nullopt,
          "Soft-capping (Gemma 2): every score s becomes softcap * tanh(s / "
          "softcap) before the softmax. Off unless given; a value given must "
          "be > 0.");
ABSL_FLAG(std::string, scale, "",
          "Softmax scale of q.k. Empty: 1/sqrt(head_dim).");
ABSL_FLAG(int64_t, block_size, 64, "Block-sparse: tokens per block.");
ABSL_FLAG(std::string, sparse_pattern, "local_window",
          "Block-sparse pattern: local_window, dilated_sparse, global_local "
          "or random.");
ABSL_FLAG(int64_t, window, 256,
          "Block-sparse local_window and global_local: tokens of the local "
          "window, rounded out to whole blocks.");
ABSL_FLAG(int64_t, stride, 2,
          "Block-sparse dilated_sparse: blocks between attended key blocks.");
ABSL_FLAG(int64_t, global_tokens, 64,
          "Block-sparse global_local: the first global_tokens tokens (rounded "
          "out to whole blocks) attend to and are attended by every block.");
ABSL_FLAG(double, density, 0.1,
          "Block-sparse random: probability that an off-diagonal block pair "
          "is on.");
ABSL_FLAG(uint64_t, seed, 0, "Block-sparse random: seed of the block mask.");
ABSL_FLAG(std::string, tile_order, "row_major",
          "Order of visiting tiles: row_major or hilbert (same results up to "
          "float rounding).");
ABSL_FLAG(std::string, dtype, "float32",
          "Compute dtype: float64, float32 or bfloat16. Outputs are written "
          "in it (float32 for bfloat16).");
ABSL_FLAG(std::string, device, "cpu", "Device: cpu, cuda or cuda:N.");
ABSL_FLAG(int64_t, ranks, 1,
          "Ranks of the sequence-parallel ring, run as threads of this "
          "process (ring types only).");
ABSL_FLAG(std::string, layout, "contiguous",
          "How a ring cuts the sequence: contiguous or zigzag.");

namespace lc {
namespace {

constexpr char kDefaultSegmentLengths[] = "2048,4096,8192";
constexpr char kDefaultDilationRates[] = "1,2,4";

absl::StatusOr<DType> ParseComputeDType(const std::string& name) {
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    if (name == DTypeName(dtype)) return dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--dtype=", name, " (expected float64, float32 or bfloat16)"));
}

// The attention configuration the flags describe, validated.
absl::StatusOr<AttentionConfig> ConfigFromFlags() {
  AttentionConfig config;
  LC_ASSIGN_OR_RETURN(
      config.type,
      ForFlag("pattern", ParseAttentionType(absl::GetFlag(FLAGS_pattern))));

  std::string segment_lengths = absl::GetFlag(FLAGS_segment_lengths);
  std::string dilation_rates = absl::GetFlag(FLAGS_dilation_rates);
  const bool dilated_type = config.type == AttentionType::kDilated ||
                            config.type == AttentionType::kRingDilated;
  if (dilated_type && segment_lengths.empty() && dilation_rates.empty()) {
    segment_lengths = kDefaultSegmentLengths;
    dilation_rates = kDefaultDilationRates;
  }
  LC_ASSIGN_OR_RETURN(config.dilated.segment_lengths,
                      ParseIntListFlag("segment_lengths", segment_lengths));
  LC_ASSIGN_OR_RETURN(config.dilated.dilation_rates,
                      ParseIntListFlag("dilation_rates", dilation_rates));
  LC_ASSIGN_OR_RETURN(
      config.dilated.head_layout,
      ForFlag("head_layout",
              ParseHeadLayout(absl::GetFlag(FLAGS_head_layout))));

  BlockSparseOptions& sparse = config.block_sparse;
  LC_ASSIGN_OR_RETURN(
      sparse.pattern,
      ForFlag("sparse_pattern",
              ParseSparsePattern(absl::GetFlag(FLAGS_sparse_pattern))));
  if (sparse.pattern == SparsePattern::kExplicit) {
    return absl::InvalidArgumentError(
        "--sparse_pattern=explicit: an explicit block mask cannot be given on "
        "the command line (expected local_window, dilated_sparse, "
        "global_local or random)");
  }
  sparse.block_size = absl::GetFlag(FLAGS_block_size);
  sparse.window = absl::GetFlag(FLAGS_window);
  sparse.stride = absl::GetFlag(FLAGS_stride);
  sparse.global_tokens = absl::GetFlag(FLAGS_global_tokens);
  sparse.density = absl::GetFlag(FLAGS_density);
  sparse.seed = absl::GetFlag(FLAGS_seed);

  config.causal = absl::GetFlag(FLAGS_causal);
  config.window_left = absl::GetFlag(FLAGS_window_left);
  config.window_right = absl::GetFlag(FLAGS_window_right);
  LC_ASSIGN_OR_RETURN(
      config.softcap,
      PositiveFlagIfGiven("softcap", absl::GetFlag(FLAGS_softcap)));
  const std::string scale = absl::GetFlag(FLAGS_scale);
  if (!scale.empty()) {
    double value;
    if (!absl::SimpleAtod(scale, &value) || !std::isfinite(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--scale=", scale,
                       " (expected a finite number, or empty for "
                       "1/sqrt(head_dim))"));
    }
    config.scale = value;
  }
  LC_ASSIGN_OR_RETURN(
      config.tile_order,
      ForFlag("tile_order", ParseTileOrder(absl::GetFlag(FLAGS_tile_order))));
  config.ranks = absl::GetFlag(FLAGS_ranks);
  LC_ASSIGN_OR_RETURN(
      config.layout,
      ForFlag("layout", ParseSequenceLayout(absl::GetFlag(FLAGS_layout))));
  LC_RETURN_IF_ERROR(ValidateAttentionConfig(config));
  return config;
}

// q, k, v and (when present) grad_out of the input file, checked: no other
// names, float32 or float64, q of rank 4 with no empty dimension, and k, v
// and grad_out of q's shape.
absl::StatusOr<std::map<std::string, Tensor>> ReadInputs(
    const std::string& path) {
  LC_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  const std::string expected_names =
      "expected q, k, v [batch, n, heads, head_dim] and optionally grad_out";
  for (const auto& [name, tensor] : file.tensors) {
    if (name != "q" && name != "k" && name != "v" && name != "grad_out") {
      return absl::InvalidArgumentError(
          absl::StrCat("input ", path, " holds a tensor named \"", name, "\" (",
                       expected_names, ")"));
    }
    if (tensor.dtype() != DType::kFloat32 &&
        tensor.dtype() != DType::kFloat64) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input ", path, ": tensor ", name, " is ", DTypeName(tensor.dtype()),
          " (expected float32 or float64)"));
    }
  }
  for (const char* name : {"q", "k", "v"}) {
    if (file.tensors.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("input ", path, " has no tensor \"", name, "\" (",
                       expected_names, ")"));
    }
  }
  const Shape& shape = file.tensors["q"].shape();
  if (shape.size() != 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input ", path, ": q has shape ", ShapeToString(shape), " of rank ",
        shape.size(), " (expected [batch, n, heads, head_dim])"));
  }
  for (int64_t size : shape) {
    if (size < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input ", path, ": q has shape ", ShapeToString(shape),
          " (expected [batch, n, heads, head_dim], every size >= 1)"));
    }
  }
  for (const auto& [name, tensor] : file.tensors) {
    if (tensor.shape() != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("input ", path, ": ", name, " has shape ",
                       ShapeToString(tensor.shape()), " but q has ",
                       ShapeToString(shape), " (expected the same shape)"));
    }
  }
  return std::move(file.tensors);
}

// A tensor as written to the output: bfloat16 widened to float32.
Tensor ForOutput(const Tensor& t) {
  return t.to(Device::Cpu()).to(ComputeDType(t.dtype()));
}

// Waits for this thread's queued work on `device`, so host timings measure
// it.
void SynchronizeDevice(Device device) {
  if (device.is_cuda()) SynchronizeCudaStream(device.index);
}

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

absl::Status Run() {
  const std::string input_path = UserPath(absl::GetFlag(FLAGS_input));
  const std::string output_path = UserPath(absl::GetFlag(FLAGS_output));
  if (input_path.empty()) {
    return absl::InvalidArgumentError(
        "missing --input (expected --input=FILE.safetensors holding q, k, v)");
  }
  if (output_path.empty()) {
    return absl::InvalidArgumentError(
        "missing --output (expected --output=FILE.safetensors to write out "
        "and lse to)");
  }
  LC_ASSIGN_OR_RETURN(const AttentionConfig config, ConfigFromFlags());
  LC_ASSIGN_OR_RETURN(const DType dtype,
                      ParseComputeDType(absl::GetFlag(FLAGS_dtype)));
  LC_ASSIGN_OR_RETURN(const Device device,
                      ParseDeviceFlag(absl::GetFlag(FLAGS_device)));

  LC_ASSIGN_OR_RETURN(const auto inputs, ReadInputs(input_path));
  const Shape& shape = inputs.at("q").shape();
  const int64_t n = shape[1], heads = shape[2];
  // A rank needs a token: more ranks would only hold empty chunks (and
  // //train refuses them too).
  if (config.ranks > n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--ranks=", config.ranks, " with ", n, " tokens in q of ", input_path,
        " (expected at most one rank per token: --ranks <= ", n, ")"));
  }
  LC_ASSIGN_OR_RETURN(const AttentionPattern pattern,
                      BuildAttentionPattern(config, heads, n));
  const bool backward = inputs.count("grad_out") != 0;

  std::map<std::string, Tensor> outputs;
  double forward_ms = 0, backward_ms = 0;
  // One rank's work: attention of its tokens (all of them on one rank),
  // then, with grad_out, backward; returns out, lse and the gradients of its
  // tokens.
  auto attend = [&](const SequenceParallelContext* sp, int k, int rank) {
    auto local = [&](const std::string& name) {
      const Tensor t = inputs.at(name).to(dtype).to(device);
      return sp == nullptr ? t : SplitSequence(t, k, rank, config.layout);
    };
    Tensor q = local("q").detach(), kk = local("k").detach(),
           v = local("v").detach();
    for (const Tensor& leaf : {q, kk, v}) leaf.set_requires_grad(backward);
    auto start = std::chrono::steady_clock::now();
    const AttentionResult result =
        RunAttention(config, q, kk, v, /*training=*/false, {}, sp);
    SynchronizeDevice(device);
    forward_ms = MillisecondsSince(start);
    std::map<std::string, Tensor> mine = {{"out", result.out},
                                          {"lse", result.lse}};
    if (backward) {
      start = std::chrono::steady_clock::now();
      Backward({result.out}, {local("grad_out").to(result.out.dtype())});
      SynchronizeDevice(device);
      backward_ms = MillisecondsSince(start);
      mine["grad_q"] = q.grad();
      mine["grad_k"] = kk.grad();
      mine["grad_v"] = v.grad();
    }
    return mine;
  };
  if (config.ranks == 1) {
    LC_RETURN_IF_ERROR(
        StatusFromCall([&] { outputs = attend(nullptr, 1, 0); }));
  } else {
    // config.ranks thread ranks, each on its tokens; the pieces are gathered
    // back into whole-sequence tensors.
    std::mutex mu;
    LC_RETURN_IF_ERROR(RunRanks(
        static_cast<int>(config.ranks),
        [&](Communicator& comm) -> absl::Status {
          SequenceParallelContext sp{&comm, n};
          std::map<std::string, Tensor> mine;
          LC_RETURN_IF_ERROR(StatusFromCall(
              [&] { mine = attend(&sp, comm.size(), comm.rank()); }));
          std::map<std::string, Tensor> gathered;
          for (const auto& [name, t] : mine) {
            // lse is [batch, heads, n]: tokens are its last dim.
            const bool stat = name == "lse";
            LC_ASSIGN_OR_RETURN(
                Tensor whole,
                GatherSequence(comm, stat ? t.transpose(1, 2).contiguous() : t,
                               n, config.layout));
            gathered[name] = stat ? whole.transpose(1, 2).contiguous() : whole;
          }
          std::lock_guard<std::mutex> lock(mu);
          if (comm.rank() == 0) outputs = std::move(gathered);
          return absl::OkStatus();
        }));
  }
  for (auto& [name, t] : outputs) t = ForOutput(t);
  if (pattern.block_mask != nullptr) {
    const BlockMask& mask = *pattern.block_mask;
    Tensor bits = Empty({mask.num_blocks(), mask.num_blocks()}, DType::kUInt8);
    const std::vector<uint8_t> dense = mask.ToDense();
    std::memcpy(bits.data<uint8_t>(), dense.data(), dense.size());
    outputs["block_mask"] = bits;
  }
  LC_RETURN_IF_ERROR(WriteSafetensors(output_path, outputs));

  std::vector<std::string> names;
  for (const auto& [name, tensor] : outputs) {
    names.push_back(absl::StrCat(name, " ", ShapeToString(tensor.shape())));
  }
  std::string timing = absl::StrFormat("forward %.1f ms", forward_ms);
  if (backward)
    absl::StrAppendFormat(&timing, ", backward %.1f ms", backward_ms);
  std::cout << "attention_cli: " << AttentionTypeName(config.type)
            << (config.causal ? " causal" : "") << " attention on q "
            << ShapeToString(shape) << " on " << config.ranks << " rank"
            << (config.ranks > 1 ? "s" : "") << " in " << DTypeName(dtype)
            << ", " << timing << "; wrote " << absl::StrJoin(names, ", ")
            << " to " << output_path << "\n";
  return absl::OkStatus();
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Runs attention on q, k, v from a safetensors file and writes out, lse "
      "and gradients.\nUsage: attention_cli --input=IN.safetensors "
      "--output=OUT.safetensors [--pattern=dense|dilated|block_sparse] "
      "[options]");
  return lc::RunTool("attention_cli", argc, argv, lc::Run);
}
