// Runs //attention:attention_cli as a user would: on safetensors files
// written byte by byte the way Python's safetensors writes them, comparing
// what it writes with RunAttention + Backward called in this process; and on
// bad flags, files and tensors, each of which must exit non-zero with one
// line naming the problem.

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention/attention_config.h"
#include "attention/reference_attention.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/random.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"
#include "tests/tools/run_program.h"

namespace lc {
namespace {

using ::lc::testing::DefaultTolerance;
using ::lc::testing::ExpectAllClose;
using ::lc::testing::TestGenerator;
using ::lc::testing::Tolerance;

// The binary, relative to the test's working directory (the runfiles root).
constexpr char kCli[] = "attention/attention_cli";

const Shape kShape = {2, 40, 3, 8};  // [batch, n, heads, head_dim]

std::string TempPath(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/", name);
}

using CliResult = testing::ProgramResult;

// Runs the CLI with `args` (each passed as one shell word), with
// BUILD_WORKING_DIRECTORY set to `working_directory` unless it is empty (as
// `bazel run` sets it).
CliResult RunCli(const std::vector<std::string>& args,
                 const std::string& working_directory = "") {
  std::vector<std::pair<std::string, std::string>> env;
  if (!working_directory.empty()) {
    env.emplace_back("BUILD_WORKING_DIRECTORY", working_directory);
  }
  return testing::RunProgram(kCli, args, env);
}

// Appends the bit pattern of `value` as little-endian bytes (Bits: the
// unsigned integer type of its size).
template <typename Bits, typename Value>
void AppendLittleEndian(Value value, std::string* out) {
  Bits bits;
  std::memcpy(&bits, &value, sizeof(bits));
  for (size_t i = 0; i < sizeof(bits); ++i) {
    out->push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
  }
}

// Writes `tensors` (float32, float64 or int64) the way Python's
// safetensors.torch.save_file does, without using core/safetensors: the
// header length as 8 little-endian bytes; a compact JSON header with
// {"format":"pt"} metadata and, per tensor in name order, dtype, shape and
// data_offsets, padded with spaces to a multiple of 8 bytes; then the
// tensors' little-endian data back to back.
void WritePythonStyleSafetensors(const std::string& path,
                                 const std::map<std::string, Tensor>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const auto& [name, tensor] : tensors) {
    const DType dtype = tensor.dtype();
    ASSERT_TRUE(dtype == DType::kFloat32 || dtype == DType::kFloat64 ||
                dtype == DType::kInt64);
    const size_t begin = data.size();
    for (double value : tensor.ToVector()) {
      if (dtype == DType::kFloat32) {
        AppendLittleEndian<uint32_t>(static_cast<float>(value), &data);
      } else if (dtype == DType::kFloat64) {
        AppendLittleEndian<uint64_t>(value, &data);
      } else {
        AppendLittleEndian<uint64_t>(static_cast<int64_t>(value), &data);
      }
    }
    const char* type = dtype == DType::kFloat32   ? "F32"
                       : dtype == DType::kFloat64 ? "F64"
                                                  : "I64";
    absl::StrAppend(&header, ",\"", name, "\":{\"dtype\":\"", type,
                    "\",\"shape\":[", absl::StrJoin(tensor.shape(), ","),
                    "],\"data_offsets\":[", begin, ",", data.size(), "]}");
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string bytes;
  AppendLittleEndian<uint64_t>(static_cast<uint64_t>(header.size()), &bytes);
  bytes += header + data;
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(file.good()) << "cannot write " << path;
}

// Random q, k, v and grad_out of `shape` in `dtype`.
std::map<std::string, Tensor> RandomInputs(DType dtype,
                                           const Shape& shape = kShape) {
  Generator gen = TestGenerator();
  std::map<std::string, Tensor> inputs;
  for (const char* name : {"q", "k", "v", "grad_out"}) {
    inputs[name] = Randn(shape, gen, dtype);
  }
  return inputs;
}

// What the CLI should write: RunAttention and Backward on the inputs
// computed in `dtype`, outputs widened from bfloat16 to float32.
std::map<std::string, Tensor> ExpectedOutputs(
    const AttentionConfig& config, const std::map<std::string, Tensor>& inputs,
    DType dtype) {
  auto leaf = [&](const std::string& name) {
    const Tensor& t = inputs.at(name);
    Tensor copy = FromVector(t.ToVector(), t.shape(), dtype);
    copy.set_requires_grad(true);
    return copy;
  };
  const Tensor q = leaf("q"), k = leaf("k"), v = leaf("v");
  const AttentionResult result =
      RunAttention(config, q, k, v, /*training=*/false);
  std::map<std::string, Tensor> expected = {
      {"out", result.out.to(ComputeDType(dtype))}, {"lse", result.lse}};
  if (inputs.count("grad_out") != 0) {
    Backward({result.out}, {inputs.at("grad_out").to(dtype)});
    expected["grad_q"] = q.grad().to(ComputeDType(dtype));
    expected["grad_k"] = k.grad().to(ComputeDType(dtype));
    expected["grad_v"] = v.grad().to(ComputeDType(dtype));
  }
  return expected;
}

// Whether x is -inf (the lse of a query with no key).
bool IsNegInf(double x) { return std::isinf(x) && x < 0; }

// lse may hold -inf (queries with no key): there both must be -inf (not
// +inf, not NaN); the other entries must be finite and within `tol`.
void ExpectLseClose(const Tensor& actual, const Tensor& expected,
                    Tolerance tol) {
  ASSERT_EQ(actual.shape(), expected.shape());
  std::vector<double> a = actual.ToVector(), e = expected.ToVector();
  for (size_t i = 0; i < e.size(); ++i) {
    ASSERT_TRUE(IsNegInf(e[i]) || std::isfinite(e[i])) << e[i];
    if (IsNegInf(e[i])) {
      EXPECT_TRUE(IsNegInf(a[i])) << "lse at flat index " << i << ": " << a[i];
      a[i] = e[i] = 0;
    }
  }
  ExpectAllClose(FromVector(a, actual.shape(), DType::kFloat64),
                 FromVector(e, expected.shape(), DType::kFloat64), tol, "lse");
}

// Writes `inputs` to a file, runs the CLI on it with `flags`, and returns
// what it wrote.
std::map<std::string, Tensor> RunOnInputs(
    const std::string& name, const std::map<std::string, Tensor>& inputs,
    const std::vector<std::string>& flags) {
  const std::string input = TempPath(name + "_in.safetensors");
  const std::string output = TempPath(name + "_out.safetensors");
  WritePythonStyleSafetensors(input, inputs);
  std::vector<std::string> args = {"--input=" + input, "--output=" + output};
  args.insert(args.end(), flags.begin(), flags.end());
  const CliResult result = RunCli(args);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("wrote"), std::string::npos) << result.output;
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(output);
  EXPECT_TRUE(file.ok()) << file.status();
  return file.ok() ? file->tensors : std::map<std::string, Tensor>();
}

// The CLI's outputs hold exactly the expected names, in the expected dtypes,
// with values within `tol` (block_mask is checked by the caller).
void ExpectOutputsMatch(const std::map<std::string, Tensor>& written,
                        const std::map<std::string, Tensor>& expected,
                        Tolerance tol) {
  for (const auto& [name, tensor] : written) {
    EXPECT_TRUE(expected.count(name) != 0 || name == "block_mask")
        << "unexpected output " << name;
  }
  for (const auto& [name, want] : expected) {
    auto it = written.find(name);
    ASSERT_NE(it, written.end()) << "no output " << name;
    EXPECT_EQ(it->second.dtype(), want.dtype()) << name;
    if (name == "lse") {
      ExpectLseClose(it->second, want, tol);
    } else {
      ExpectAllClose(it->second, want, tol, name);
    }
  }
}

// The written block_mask is uint8 [blocks, blocks] holding the mask that
// BuildAttentionPattern makes for `config`.
void ExpectBlockMask(const std::map<std::string, Tensor>& written,
                     const AttentionConfig& config) {
  absl::StatusOr<AttentionPattern> pattern =
      BuildAttentionPattern(config, kShape[2], kShape[1]);
  ASSERT_TRUE(pattern.ok()) << pattern.status();
  const BlockMask& mask = *pattern->block_mask;
  auto it = written.find("block_mask");
  ASSERT_NE(it, written.end()) << "no block_mask written";
  EXPECT_EQ(it->second.dtype(), DType::kUInt8);
  EXPECT_EQ(it->second.shape(), Shape({mask.num_blocks(), mask.num_blocks()}));
  const std::vector<double> bits = it->second.ToVector();
  const std::vector<uint8_t> expected = mask.ToDense();
  ASSERT_EQ(bits.size(), expected.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    EXPECT_EQ(bits[i], expected[i]) << "block_mask at flat index " << i;
  }
}

TEST(AttentionCliTest, DilatedHeadGroupsCausalMatchesInProcess) {
  const auto inputs = RandomInputs(DType::kFloat32);
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {16, 32};  // n = 40: short last segments
  config.dilated.dilation_rates = {1, 2};
  config.causal = true;
  const auto written =
      RunOnInputs("dilated_groups", inputs,
                  {"--pattern=dilated", "--segment_lengths=16,32",
                   "--dilation_rates=1,2", "--causal"});
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
  EXPECT_EQ(written.count("block_mask"), 0u);
  // Head 2 has pattern (32, 2, 1): its even positions select no key.
  ASSERT_EQ(written.count("lse"), 1u);
  EXPECT_TRUE(IsNegInf(written.at("lse").at({0, 2, 0})))
      << written.at("lse").at({0, 2, 0});
}

TEST(AttentionCliTest, DilatedAllHeadsScaleHilbertMatchesInProcess) {
  const auto inputs = RandomInputs(DType::kFloat32);
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {8, 24};
  config.dilated.dilation_rates = {1, 3};
  config.dilated.head_layout = HeadLayout::kAllHeads;
  config.scale = 0.3;
  config.tile_order = TileOrder::kHilbert;
  const auto written = RunOnInputs(
      "dilated_all_heads", inputs,
      {"--segment_lengths=8,24", "--dilation_rates=1,3",
       "--head_layout=all_heads", "--scale=0.3", "--tile_order=hilbert"});
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
}

TEST(AttentionCliTest, DefaultPatternIsTheDilatedAttentionPytorchExample) {
  const auto inputs = RandomInputs(DType::kFloat32);
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {2048, 4096, 8192};
  config.dilated.dilation_rates = {1, 2, 4};
  const auto written = RunOnInputs("default_pattern", inputs, {});
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
}

TEST(AttentionCliTest, RingDilatedOnOneRankMatchesDilated) {
  const auto inputs = RandomInputs(DType::kFloat32);
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {16, 32};
  config.dilated.dilation_rates = {1, 2};
  config.causal = true;
  const auto written = RunOnInputs(
      "ring_dilated", inputs,
      {"--pattern=ring_dilated", "--segment_lengths=16,32",
       "--dilation_rates=1,2", "--causal", "--ranks=1", "--layout=zigzag"});
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
}

// --ranks=K runs the ring on K thread ranks and writes whole-sequence
// outputs equal to one rank's.
TEST(AttentionCliTest, RingOnThreadRanksMatchesOneRank) {
  const auto inputs = RandomInputs(DType::kFloat32);
  for (const char* layout : {"contiguous", "zigzag"}) {
    SCOPED_TRACE(layout);
    AttentionConfig config;
    config.type = AttentionType::kDilated;
    config.dilated.segment_lengths = {16, 32};
    config.dilated.dilation_rates = {1, 2};
    config.causal = true;
    const auto written =
        RunOnInputs(absl::StrCat("ring3_", layout), inputs,
                    {"--pattern=ring_dilated", "--segment_lengths=16,32",
                     "--dilation_rates=1,2", "--causal", "--ranks=3",
                     absl::StrCat("--layout=", layout)});
    ExpectOutputsMatch(written,
                       ExpectedOutputs(config, inputs, DType::kFloat32),
                       DefaultTolerance(DType::kFloat32));
  }
}

// --window_left, --window_right and --softcap reach the attention of every
// pattern type, on one rank and on 2 ranks of each ring type (both
// layouts), causal and not: out and lse equal the float64 oracle given the
// window and the cap directly (not through AttentionConfig), and every
// output, the gradients among them, equals the in-process computation.
TEST(AttentionCliTest, WindowsAndSoftcapMatchTheOracle) {
  const auto inputs = RandomInputs(DType::kFloat64);
  const Tolerance tol = DefaultTolerance(DType::kFloat64);
  struct Case {
    std::string name;
    AttentionType type;  // of the in-process computation, on one rank
    bool causal;
    std::vector<std::string> flags;
  };
  const std::vector<Case> cases = {
      {"dense", AttentionType::kDense, false, {"--pattern=dense"}},
      {"dilated", AttentionType::kDilated, true, {"--pattern=dilated"}},
      {"block_sparse",
       AttentionType::kBlockSparse,
       false,
       {"--pattern=block_sparse"}},
      {"ring_dilated_contiguous",
       AttentionType::kDilated,
       true,
       {"--pattern=ring_dilated", "--ranks=2", "--layout=contiguous"}},
      {"ring_dilated_zigzag",
       AttentionType::kDilated,
       true,
       {"--pattern=ring_dilated", "--ranks=2", "--layout=zigzag"}},
      {"ring_block_sparse",
       AttentionType::kBlockSparse,
       false,
       {"--pattern=ring_block_sparse", "--ranks=2"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    AttentionConfig config;
    config.type = c.type;
    std::vector<std::string> flags = c.flags;
    if (c.type == AttentionType::kDilated) {
      config.dilated.segment_lengths = {16, 32};
      config.dilated.dilation_rates = {1, 2};
      flags.insert(flags.end(),
                   {"--segment_lengths=16,32", "--dilation_rates=1,2"});
    }
    if (c.type == AttentionType::kBlockSparse) {
      config.block_sparse.block_size = 8;
      config.block_sparse.window = 16;
      flags.insert(flags.end(), {"--block_size=8", "--window=16"});
    }
    config.causal = c.causal;
    if (c.causal) flags.push_back("--causal");
    config.window_left = 5;
    config.window_right = 2;
    config.softcap = 0.9;
    flags.insert(flags.end(), {"--window_left=5", "--window_right=2",
                               "--softcap=0.9", "--dtype=float64"});
    const auto written = RunOnInputs("window_" + c.name, inputs, flags);
    ExpectOutputsMatch(written,
                       ExpectedOutputs(config, inputs, DType::kFloat64), tol);

    absl::StatusOr<AttentionPattern> pattern =
        BuildAttentionPattern(config, kShape[2], kShape[1]);
    ASSERT_TRUE(pattern.ok()) << pattern.status();
    AttentionOptions options;
    options.causal = c.causal;
    options.window_left = 5;
    options.window_right = 2;
    options.softcap = 0.9;
    const AttentionResult oracle = ReferenceAttention(
        inputs.at("q"), inputs.at("k"), inputs.at("v"), *pattern, options);
    ASSERT_EQ(written.count("out"), 1u);
    ExpectAllClose(written.at("out"), oracle.out, tol, "out vs the oracle");
    ExpectLseClose(written.at("lse"), oracle.lse, tol);
  }
}

// Runs the tool with `flags` on random float32 inputs and expects the
// in-process float32 result of `config` and its block mask.
void ExpectBlockSparseMatches(const std::string& name,
                              const AttentionConfig& config,
                              const std::vector<std::string>& flags) {
  const auto inputs = RandomInputs(DType::kFloat32);
  const auto written = RunOnInputs(name, inputs, flags);
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
  ExpectBlockMask(written, config);
}

TEST(AttentionCliTest, BlockSparseGlobalLocalMatchesInProcess) {
  AttentionConfig config;
  config.type = AttentionType::kBlockSparse;
  config.block_sparse.pattern = SparsePattern::kGlobalLocal;
  config.block_sparse.block_size = 8;
  config.block_sparse.window = 8;
  config.block_sparse.global_tokens = 4;
  config.causal = true;
  ExpectBlockSparseMatches(
      "block_sparse_global_local", config,
      {"--pattern=block_sparse", "--sparse_pattern=global_local",
       "--block_size=8", "--window=8", "--global_tokens=4", "--causal"});
}

TEST(AttentionCliTest, BlockSparseRandomIntersectedWithDilatedMatches) {
  AttentionConfig config;
  config.type = AttentionType::kBlockSparse;
  config.block_sparse.pattern = SparsePattern::kRandom;
  config.block_sparse.block_size = 8;
  config.block_sparse.density = 0.4;
  config.block_sparse.seed = 7;
  config.dilated.segment_lengths = {16};
  config.dilated.dilation_rates = {2};
  ExpectBlockSparseMatches("block_sparse_random", config,
                           {"--pattern=block_sparse", "--sparse_pattern=random",
                            "--block_size=8", "--density=0.4", "--seed=7",
                            "--segment_lengths=16", "--dilation_rates=2"});
}

TEST(AttentionCliTest, BlockSparseLocalWindowMatchesInProcess) {
  AttentionConfig config;
  config.type = AttentionType::kBlockSparse;
  config.block_sparse.pattern = SparsePattern::kLocalWindow;
  config.block_sparse.block_size = 8;
  config.block_sparse.window = 9;  // two blocks each way
  config.causal = true;
  ExpectBlockSparseMatches(
      "block_sparse_local_window", config,
      {"--pattern=block_sparse", "--sparse_pattern=local_window",
       "--block_size=8", "--window=9", "--causal"});
}

TEST(AttentionCliTest, BlockSparseDilatedSparseOnCpuMatchesInProcess) {
  AttentionConfig config;
  config.type = AttentionType::kBlockSparse;
  config.block_sparse.pattern = SparsePattern::kDilatedSparse;
  config.block_sparse.block_size = 4;
  config.block_sparse.stride = 3;
  ExpectBlockSparseMatches(
      "block_sparse_dilated_sparse", config,
      {"--pattern=block_sparse", "--sparse_pattern=dilated_sparse",
       "--block_size=4", "--stride=3", "--device=cpu"});
}

TEST(AttentionCliTest, DenseWithoutGradOutWritesOutAndLseOnly) {
  auto inputs = RandomInputs(DType::kFloat32);
  inputs.erase("grad_out");
  AttentionConfig config;
  config.type = AttentionType::kDense;
  const auto written = RunOnInputs("dense", inputs, {"--pattern=dense"});
  EXPECT_EQ(written.size(), 2u);
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
}

// Runs the tool on random inputs of `file_dtype` under a dilated pattern
// (segments 16,32, rates 1,2) computing in `compute`, and expects the same
// computation in this process, every output written as `written` (to that
// dtype's tolerance).
void ExpectComputedIn(const std::string& name, DType file_dtype, DType compute,
                      bool causal, DType written) {
  const auto inputs = RandomInputs(file_dtype);
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {16, 32};
  config.dilated.dilation_rates = {1, 2};
  config.causal = causal;
  std::vector<std::string> flags = {"--segment_lengths=16,32",
                                    "--dilation_rates=1,2",
                                    "--dtype=" + DTypeName(compute)};
  if (causal) flags.push_back("--causal");
  const auto outputs = RunOnInputs(name, inputs, flags);
  ExpectOutputsMatch(outputs, ExpectedOutputs(config, inputs, compute),
                     DefaultTolerance(written));
  for (const auto& [output, tensor] : outputs) {
    EXPECT_EQ(tensor.dtype(), written) << output;
  }
}

TEST(AttentionCliTest, Float64FileComputedInFloat64) {
  ExpectComputedIn("float64", DType::kFloat64, DType::kFloat64,
                   /*causal=*/false, DType::kFloat64);
}

// A float64 file computed in float32: the inputs are rounded to float32 and
// every output is float32.
TEST(AttentionCliTest, Float64FileComputedInFloat32) {
  ExpectComputedIn("float64_as_float32", DType::kFloat64, DType::kFloat32,
                   /*causal=*/false, DType::kFloat32);
}

// A float32 file computed in float64: every output is float64, to float64
// tolerance of the computation on the float32 values.
TEST(AttentionCliTest, Float32FileComputedInFloat64) {
  ExpectComputedIn("float32_as_float64", DType::kFloat32, DType::kFloat64,
                   /*causal=*/true, DType::kFloat64);
}

// bfloat16 compute: the same bfloat16 computation in this process, widened
// to float32 outputs.
TEST(AttentionCliTest, BFloat16ComputeWritesFloat32Outputs) {
  ExpectComputedIn("bfloat16", DType::kFloat32, DType::kBFloat16,
                   /*causal=*/true, DType::kFloat32);
}

TEST(AttentionCliTest, RelativePathsAreRelativeToTheBazelRunDirectory) {
  WritePythonStyleSafetensors(TempPath("relative_in.safetensors"),
                              RandomInputs(DType::kFloat32));
  const CliResult result = RunCli(
      {"--input=relative_in.safetensors", "--output=relative_out.safetensors"},
      ::testing::TempDir());
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_TRUE(ReadSafetensors(TempPath("relative_out.safetensors")).ok());
}

// Runs the CLI with `args` (plus an --output flag when `with_output`) and
// expects exit status 1, exactly one line of output containing every piece,
// and no output file.
void ExpectCliError(const std::vector<std::string>& args,
                    const std::vector<std::string>& pieces,
                    bool with_output = true) {
  const std::string output = TempPath("error_out.safetensors");
  std::remove(output.c_str());
  std::vector<std::string> all = args;
  if (with_output) all.push_back("--output=" + output);
  const CliResult result = RunCli(all);
  EXPECT_EQ(result.exit_code, 1) << result.output;
  ASSERT_FALSE(result.output.empty());
  EXPECT_EQ(result.output.find('\n'), result.output.size() - 1)
      << "expected exactly one line, got:\n"
      << result.output;
  for (const std::string& piece : pieces) {
    EXPECT_NE(result.output.find(piece), std::string::npos)
        << "\"" << result.output << "\" lacks \"" << piece << "\"";
  }
  EXPECT_FALSE(std::ifstream(output).good()) << "an output file was written";
}

// Writes `inputs` to a fresh file and returns its --input flag.
std::string InputFlag(const std::string& name,
                      const std::map<std::string, Tensor>& inputs) {
  const std::string path = TempPath(name + ".safetensors");
  WritePythonStyleSafetensors(path, inputs);
  return "--input=" + path;
}

TEST(AttentionCliTest, MissingInputOrOutputFlag) {
  ExpectCliError({}, {"missing --input"});
  const std::string input = InputFlag("good", RandomInputs(DType::kFloat32));
  ExpectCliError({input}, {"missing --output"}, /*with_output=*/false);
}

TEST(AttentionCliTest, NonexistentInputFile) {
  ExpectCliError({"--input=/nonexistent/qkv.safetensors"},
                 {"/nonexistent/qkv.safetensors", "No such file"});
}

TEST(AttentionCliTest, CorruptInputFile) {
  const std::string path = TempPath("corrupt.safetensors");
  std::ofstream(path) << "not a safetensors file";
  ExpectCliError({"--input=" + path}, {path, "header length"});
}

TEST(AttentionCliTest, MissingTensorV) {
  auto inputs = RandomInputs(DType::kFloat32);
  inputs.erase("v");
  ExpectCliError({InputFlag("no_v", inputs)}, {"no tensor \"v\""});
}

TEST(AttentionCliTest, UnknownTensorName) {
  auto inputs = RandomInputs(DType::kFloat32);
  inputs["grad_output"] = inputs.at("grad_out");
  ExpectCliError({InputFlag("extra_name", inputs)},
                 {"\"grad_output\"", "optionally grad_out"});
}

TEST(AttentionCliTest, QOfRankThree) {
  auto inputs = RandomInputs(DType::kFloat32, {2, 40, 24});
  ExpectCliError({InputFlag("rank3", inputs)},
                 {"q has shape [2, 40, 24]", "rank 3", "[batch, n, heads"});
}

TEST(AttentionCliTest, EmptyDimension) {
  auto inputs = RandomInputs(DType::kFloat32, {2, 0, 3, 8});
  ExpectCliError({InputFlag("empty", inputs)}, {"q has shape", ">= 1"});
}

TEST(AttentionCliTest, KShapeMismatch) {
  auto inputs = RandomInputs(DType::kFloat32);
  Generator gen = TestGenerator(1);
  inputs["k"] = Randn({2, 40, 3, 4}, gen);
  ExpectCliError({InputFlag("k_mismatch", inputs)},
                 {"k has shape [2, 40, 3, 4]", "[2, 40, 3, 8]"});
}

TEST(AttentionCliTest, GradOutShapeMismatch) {
  auto inputs = RandomInputs(DType::kFloat32);
  Generator gen = TestGenerator(1);
  inputs["grad_out"] = Randn({2, 40, 3, 7}, gen);
  ExpectCliError({InputFlag("grad_out_mismatch", inputs)},
                 {"grad_out has shape [2, 40, 3, 7]"});
}

TEST(AttentionCliTest, SegmentAndDilationListsOfDifferentLengths) {
  const std::string input = InputFlag("lists", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--segment_lengths=16,32", "--dilation_rates=1"},
                 {"segment_lengths", "dilation_rates", "different lengths"});
}

TEST(AttentionCliTest, GarbageInList) {
  const std::string input = InputFlag("garbage", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--segment_lengths=1,x", "--dilation_rates=1,2"},
                 {"--segment_lengths=1,x", "\"x\"", "not an integer"});
}

TEST(AttentionCliTest, BadFlagValues) {
  const std::string input = InputFlag("flags", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--pattern=sliding"}, {"--pattern", "\"sliding\""});
  ExpectCliError({input, "--head_layout=rows"}, {"--head_layout", "\"rows\""});
  ExpectCliError({input, "--sparse_pattern=explicit"},
                 {"--sparse_pattern=explicit"});
  ExpectCliError({input, "--dtype=float16"}, {"--dtype=float16"});
  ExpectCliError({input, "--scale=big"}, {"--scale=big"});
  ExpectCliError({input, "--pattern=block_sparse", "--block_size=0"},
                 {"block_size 0"});
  ExpectCliError({input, "--window=wide"}, {"'wide'", "window"});
  ExpectCliError({input, "--tile_order=zorder"},
                 {"--tile_order", "\"zorder\""});
  ExpectCliError({input, "--layout=diagonal"}, {"--layout", "\"diagonal\""});
  ExpectCliError({input, "--device=tpu"},
                 {"--device=tpu", "cpu, cuda or cuda:N"});
  ExpectCliError({input, "stray"}, {"unexpected argument \"stray\""});
}

// A window below -1, and a --softcap given as anything but a finite number
// > 0 (leaving it out is how to turn soft-capping off, so 0 is refused too).
TEST(AttentionCliTest, BadWindowsAndSoftcap) {
  const std::string input = InputFlag("window", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--window_left=-2"},
                 {"window_left -2", ">= 0, or -1 for unlimited"});
  ExpectCliError(
      {input, "--pattern=ring_dilated", "--ranks=2", "--window_right=-5"},
      {"window_right -5", ">= 0, or -1 for unlimited"});
  ExpectCliError({input, "--window_left=wide"}, {"'wide'", "window_left"});
  for (const char* cap : {"0", "-1", "inf", "nan"}) {
    ExpectCliError({input, absl::StrCat("--softcap=", cap)},
                   {absl::StrCat("--softcap=", cap), "finite number > 0",
                    "without --softcap it is off"});
  }
}

// A misspelled flag is reported by the flag parser: one line, exit 1.
TEST(AttentionCliTest, MisspelledFlag) {
  const std::string input = InputFlag("typo", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--windw=8"}, {"windw"});
}

TEST(AttentionCliTest, BadNumbersInFlags) {
  const std::string input = InputFlag("numbers", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--ranks=0"}, {"ranks 0", ">= 1"});
  ExpectCliError({input, "--segment_lengths=0,16", "--dilation_rates=1,2"},
                 {"segment length 0", ">= 1"});
  ExpectCliError({input, "--segment_lengths=8,16", "--dilation_rates=1,0"},
                 {"dilation rate 0", ">= 1"});
  ExpectCliError({input, "--pattern=block_sparse", "--sparse_pattern=random",
                  "--density=1.5"},
                 {"density 1.5", "[0, 1]"});
  ExpectCliError({input, "--scale=nan"}, {"--scale=nan", "finite"});
  ExpectCliError({input, "--scale=inf"}, {"--scale=inf", "finite"});
}

// Values near INT64_MAX that SPEC section 2 allows give the answer of their
// small equivalents over n = 40 tokens: --block_size above n is one block
// of n tokens, a dilation rate above its segment selects t mod w == o
// alone, a segment above n is the whole sequence, on one rank and on a
// ring. (The CLI wrote a [0, 0] mask and all-zero output for the block
// size, and lse -inf everywhere for the rate, with exit 0.)
TEST(AttentionCliTest, Int64MaxBlockSizeAndRatesGiveTheirEquivalentsAnswer) {
  const std::string max = "9223372036854775807";
  const auto inputs = RandomInputs(DType::kFloat32);
  const Tolerance tol = DefaultTolerance(DType::kFloat32);
  AttentionConfig one_block;
  one_block.type = AttentionType::kBlockSparse;
  one_block.block_sparse.block_size = kShape[1];
  const auto blocks = RunOnInputs(
      "max_block", inputs, {"--pattern=block_sparse", "--block_size=" + max});
  ExpectOutputsMatch(blocks,
                     ExpectedOutputs(one_block, inputs, DType::kFloat32), tol);
  ExpectBlockMask(blocks, one_block);

  // Groups (w, r, o) = (max, max, 0) and (6, max, 1) are (40, 40, 0) and
  // (6, 6, 1) over 40 tokens.
  AttentionConfig rates;
  rates.type = AttentionType::kDilated;
  rates.dilated.segment_lengths = {kShape[1], 6};
  rates.dilated.dilation_rates = {kShape[1], 6};
  const auto expected = ExpectedOutputs(rates, inputs, DType::kFloat32);
  for (const char* ranks : {"1", "2"}) {
    SCOPED_TRACE(absl::StrCat(ranks, " ranks"));
    ExpectOutputsMatch(
        RunOnInputs(absl::StrCat("max_rate_", ranks), inputs,
                    {"--pattern=ring_dilated", absl::StrCat("--ranks=", ranks),
                     "--segment_lengths=" + max + ",6",
                     "--dilation_rates=" + max + "," + max}),
        expected, tol);
  }
}

// +inf in one key of batch 0 (with column 0 of q positive, so each of its
// scores is +inf): every query of batch 0 gets out NaN and lse +inf, as the
// float64 oracle gives, and batch 1 is as without it. (The CLI reported
// those rows as having no key: out 0, lse -inf.)
TEST(AttentionCliTest, InfInKGivesNaNRowsNotEmptyRows) {
  auto inputs = RandomInputs(DType::kFloat64);
  inputs.erase("grad_out");
  const int64_t heads = kShape[2], d = kShape[3];
  std::vector<double> q = inputs["q"].ToVector(), k = inputs["k"].ToVector();
  for (size_t i = 0; i < q.size(); i += d) q[i] = std::abs(q[i]);
  for (int64_t h = 0; h < heads; ++h) {
    k[(3 * heads + h) * d] = std::numeric_limits<double>::infinity();
  }
  inputs["q"] = FromVector(q, kShape, DType::kFloat64);
  inputs["k"] = FromVector(k, kShape, DType::kFloat64);
  const auto written =
      RunOnInputs("inf_k", inputs, {"--pattern=dense", "--dtype=float64"});
  ASSERT_EQ(written.count("out"), 1u);
  const Tensor out = written.at("out"), lse = written.at("lse");
  for (double x : out.slice(0, 0, 1).ToVector()) EXPECT_TRUE(std::isnan(x));
  for (double x : lse.slice(0, 0, 1).ToVector()) {
    EXPECT_EQ(x, std::numeric_limits<double>::infinity());
  }
  AttentionConfig dense;
  dense.type = AttentionType::kDense;
  const auto expected = ExpectedOutputs(dense, inputs, DType::kFloat64);
  const Tolerance tol = DefaultTolerance(DType::kFloat64);
  ExpectAllClose(out.slice(0, 1, 2), expected.at("out").slice(0, 1, 2), tol,
                 "out of batch 1");
  ExpectAllClose(lse.slice(0, 1, 2), expected.at("lse").slice(0, 1, 2), tol,
                 "lse of batch 1");
}

// An int64 tensor among the inputs is named with its dtype.
TEST(AttentionCliTest, Int64Tensor) {
  auto inputs = RandomInputs(DType::kFloat32);
  inputs["v"] = Zeros(kShape, DType::kInt64);
  ExpectCliError({InputFlag("int64", inputs)},
                 {"tensor v is int64", "float32 or float64"});
}

TEST(AttentionCliTest, SeveralRanksNeedARingType) {
  const std::string input = InputFlag("ranks", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--ranks=2"}, {"ranks 2", "dilated"});
}

// More ranks than tokens is refused before any rank starts (1,000 ranks on
// 32 tokens once grew to 23 GB); as many ranks as tokens run.
TEST(AttentionCliTest, MoreRanksThanTokensIsRefused) {
  const auto inputs = RandomInputs(DType::kFloat32);
  const int64_t n = kShape[1];
  ExpectCliError({InputFlag("too_many_ranks", inputs), "--pattern=ring_dilated",
                  absl::StrCat("--ranks=", n + 1)},
                 {absl::StrCat("--ranks=", n + 1), absl::StrCat(n, " tokens"),
                  absl::StrCat("<= ", n)});
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {16, 32};
  config.dilated.dilation_rates = {1, 2};
  ExpectOutputsMatch(
      RunOnInputs("one_rank_per_token", inputs,
                  {"--pattern=ring_dilated", "--segment_lengths=16,32",
                   "--dilation_rates=1,2", absl::StrCat("--ranks=", n)}),
      ExpectedOutputs(config, inputs, DType::kFloat32),
      DefaultTolerance(DType::kFloat32));
}

TEST(AttentionCliTest, CudaDeviceRunsOnTheGpuOrNamesTheMissingDevice) {
  const auto inputs = RandomInputs(DType::kFloat32);
  ExpectCliError({InputFlag("cuda_bad", inputs), "--device=cuda:x"},
                 {"--device=cuda:x", "cuda:N"});
  if (CudaDeviceCount() == 0) {
    ExpectCliError({InputFlag("cuda", inputs), "--device=cuda"},
                   {"--device=cuda", "0 CUDA devices"});
    return;
  }
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.dilated.segment_lengths = {16, 32};
  config.dilated.dilation_rates = {1, 2};
  config.causal = true;
  const auto written =
      RunOnInputs("dilated_cuda", inputs,
                  {"--pattern=dilated", "--segment_lengths=16,32",
                   "--dilation_rates=1,2", "--causal", "--device=cuda"});
  ExpectOutputsMatch(written, ExpectedOutputs(config, inputs, DType::kFloat32),
                     DefaultTolerance(DType::kFloat32));
}

TEST(AttentionCliTest, UnwritableOutput) {
  const std::string input =
      InputFlag("unwritable", RandomInputs(DType::kFloat32));
  ExpectCliError({input, "--output=/nonexistent/dir/out.safetensors"},
                 {"/nonexistent/dir/out.safetensors"}, /*with_output=*/false);
}

// A FIFO as --input used to block until some writer came: it is refused at
// once (the CLI is killed after 60 s, so that a regression fails instead of
// hanging the test).
TEST(AttentionCliTest, FifoInputIsRefusedAtOnce) {
  const std::string fifo = TempPath("input_fifo");
  std::remove(fifo.c_str());
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const std::string output = TempPath("fifo_in_out.safetensors");
  std::remove(output.c_str());
  const CliResult result = testing::RunProgram(
      "timeout", {"60", kCli, "--input=" + fifo, "--output=" + output});
  EXPECT_EQ(result.exit_code, 1) << result.output;  // 124: it blocked
  EXPECT_EQ(result.output.find('\n'), result.output.size() - 1)
      << result.output;
  EXPECT_NE(result.output.find(fifo + " is a FIFO"), std::string::npos)
      << result.output;
  EXPECT_FALSE(std::ifstream(output).good()) << "an output file was written";
}

// The output is renamed into place: a target that is not a regular file (a
// FIFO, a directory, a device: as root, --output=/dev/full replaced the
// device node with a regular file) is refused and left as it was. A
// symbolic link to /dev/full stands for the device, so that even a broken
// CLI cannot replace the real one.
TEST(AttentionCliTest, OutputThatIsNotARegularFileIsRefused) {
  const std::string input = InputFlag("special", RandomInputs(DType::kFloat32));
  const std::string fifo = TempPath("output_fifo");
  const std::string directory = TempPath("output_dir");
  const std::string device = TempPath("output_device");
  std::remove(fifo.c_str());
  std::remove(device.c_str());
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_TRUE(mkdir(directory.c_str(), 0700) == 0 || errno == EEXIST);
  ASSERT_EQ(symlink("/dev/full", device.c_str()), 0);
  ExpectCliError({input, "--output=" + fifo}, {fifo, "is a FIFO"},
                 /*with_output=*/false);
  ExpectCliError({input, "--output=" + directory},
                 {directory, "is a directory"}, /*with_output=*/false);
  ExpectCliError({input, "--output=" + device},
                 {device, "is a character device"}, /*with_output=*/false);
  struct stat info;
  ASSERT_EQ(lstat(fifo.c_str(), &info), 0);
  EXPECT_TRUE(S_ISFIFO(info.st_mode));
  ASSERT_EQ(lstat(directory.c_str(), &info), 0);
  EXPECT_TRUE(S_ISDIR(info.st_mode));
  ASSERT_EQ(lstat(device.c_str(), &info), 0);
  EXPECT_TRUE(S_ISLNK(info.st_mode));
}

}  // namespace
}  // namespace lc
