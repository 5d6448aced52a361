// Bad inputs to Attention, DilatedHeadPatterns, MakeBlockMask and the
// parsers: each is an lc::Error or an InvalidArgument Status whose message
// names the bad value and what was expected.
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "attention/multihead_attention.h"
#include "attention/partial_attention.h"
#include "attention/pattern.h"
#include "attention/reference_attention.h"
#include "attention/tile_plan.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/attention/attention_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::DenseHeads;
using testing::ExpectError;
using ::testing::HasSubstr;

// An InvalidArgument status whose message contains every piece.
template <typename T>
void ExpectInvalid(const absl::StatusOr<T>& result,
                   const std::vector<std::string>& pieces) {
  ASSERT_FALSE(result.ok()) << "expected an error mentioning " << pieces[0];
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  for (const std::string& piece : pieces) {
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(piece));
  }
}

// q, k, v on different devices: an lc::Error naming both, from the input
// checks before any kernel (the CUDA tensors live in host memory, so no GPU
// is needed and none is touched).
TEST(AttentionErrorsTest, AttentionRejectsCpuAndCudaMix) {
  testing::ScopedHostCudaAllocator host_cuda;
  const Tensor cpu = Zeros({1, 8, 2, 4});
  const Tensor cuda = Empty({1, 8, 2, 4}, DType::kFloat32, Device::Cuda(0));
  const AttentionPattern pattern = DenseHeads(2, 8);
  ExpectError([&] { Attention(cpu, cuda, cpu, pattern); }, {"cuda:0", "cpu"});
  ExpectError([&] { Attention(cpu, cpu, cuda, pattern); }, {"cuda:0", "cpu"});
  ExpectError([&] { Attention(cuda, cpu, cpu, pattern); }, {"cuda:0", "cpu"});
  ExpectError([&] { Attention(cuda, cuda, cpu, pattern); }, {"cuda:0", "cpu"});
}

TEST(AttentionErrorsTest, AttentionRejectsBadShapesAndDtypes) {
  const Tensor q = Zeros({2, 16, 3, 4});
  const AttentionPattern pattern = DenseHeads(3, 16);
  ExpectError(
      [&] {
        Attention(q, Zeros({2, 16, 3, 5}), q, pattern);
      },
      {"[2, 16, 3, 5]", "must have the same shape"});
  ExpectError(
      [&] {
        Attention(q, q, Zeros({2, 15, 3, 4}), pattern);
      },
      {"[2, 15, 3, 4]", "must have the same shape"});
  ExpectError(
      [&] {
        const Tensor r3 = Zeros({16, 3, 4});
        Attention(r3, r3, r3, pattern);
      },
      {"[16, 3, 4]", "expected [batch, n, heads, head_dim]"});
  ExpectError([&] { Attention(q, q.to(DType::kFloat64), q, pattern); },
              {"float32, float64, float32", "expected one dtype"});
  ExpectError(
      [&] {
        const Tensor i = Zeros({2, 16, 3, 4}, DType::kInt64);
        Attention(i, i, i, pattern);
      },
      {"dtype int64", "expected float32, float64 or bfloat16"});
  ExpectError([&] { Attention(Tensor(), q, q, pattern); },
              {"q has shape undefined"});
  ExpectError([&] { Attention(q, Tensor(), q, pattern); }, {"must be defined"});
  ExpectError([&] { Attention(q, q, Tensor(), pattern); }, {"must be defined"});
}

// An undefined k or v next to a bfloat16 q is a user error like any other:
// an lc::Error, not an abort. Run in a child process (the statement exits 0
// only when it throws lc::Error), so a crash fails this test alone.
TEST(AttentionErrorsTest,
     UndefinedKeyWithBFloat16QueryThrowsInsteadOfAborting) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  const Tensor q = Zeros({1, 8, 2, 4}, DType::kBFloat16);
  const AttentionPattern pattern = DenseHeads(2, 8);
  for (int undefined : {1, 2}) {
    SCOPED_TRACE(undefined == 1 ? "k undefined" : "v undefined");
    EXPECT_EXIT(
        {
          try {
            Attention(q, undefined == 1 ? Tensor() : q,
                      undefined == 2 ? Tensor() : q, pattern);
          } catch (const Error&) {
            std::exit(0);
          }
          std::exit(1);
        },
        ::testing::ExitedWithCode(0), "");
  }
}

TEST(AttentionErrorsTest, AttentionRejectsPatternsThatDoNotFit) {
  const Tensor q = Zeros({1, 16, 3, 4});
  ExpectError([&] { Attention(q, q, q, DenseHeads(2, 16)); },
              {"pattern has 2 heads", "q has 3"});
  AttentionPattern bad_offset = DenseHeads(3, 16);
  bad_offset.head_patterns[1] = {{8, 2, 2}};
  ExpectError([&] { Attention(q, q, q, bad_offset); },
              {"head 1", "(w=8, r=2, o=2)", "0 <= o < r"});
  AttentionPattern zero_w = DenseHeads(3, 16);
  zero_w.head_patterns[2] = {{0, 1, 0}};
  ExpectError([&] { Attention(q, q, q, zero_w); }, {"head 2", "w >= 1"});
  // A block mask made for n = 24 (3 blocks of 8) on n = 16.
  AttentionPattern wrong_length = DenseHeads(3, 16);
  BlockSparseOptions local;
  local.block_size = 8;
  auto mask = MakeBlockMask(local, 24);
  ASSERT_TRUE(mask.ok());
  wrong_length.block_mask = std::make_shared<BlockMask>(*mask);
  ExpectError([&] { Attention(q, q, q, wrong_length); },
              {"block mask of 3 blocks of 8 tokens", "does not cover n = 16"});
}

TEST(AttentionErrorsTest, AttentionRejectsBadOptions) {
  const Tensor q = Zeros({2, 16, 3, 4});
  const AttentionPattern pattern = DenseHeads(3, 16);
  AttentionOptions options;
  AttentionCallOptions call;
  options.dropout = 1.0;
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"dropout 1", "expected in [0, 1)"});
  options.dropout = -0.1;
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"dropout -0.1", "expected in [0, 1)"});
  options.dropout = std::numeric_limits<double>::quiet_NaN();
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"dropout nan", "expected in [0, 1)"});
  options.dropout = 0;
  call.key_padding_mask = Zeros({2, 15}, DType::kUInt8);
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"key_padding_mask is uint8 [2, 15]", "expected uint8 [2, 16]"});
  call.key_padding_mask = Zeros({2, 16}, DType::kFloat32);
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"key_padding_mask is float32 [2, 16]", "expected uint8"});
  call.key_padding_mask = Tensor();
  options.scale = std::numeric_limits<double>::infinity();
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"scale inf", "expected a finite number"});
  options.scale.reset();
  options.query_tile = 0;
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"tile sizes 0 x 256", "expected >= 1"});
}

// kCudnn with deterministic is refused by Attention itself, before any
// forward runs (it once failed only in backward), on the CPU and on CUDA
// tensors alike (these live in host memory: no GPU is needed or touched).
TEST(AttentionErrorsTest, AttentionRefusesCudnnWithDeterministicUpFront) {
  testing::ScopedHostCudaAllocator host_cuda;
  AttentionOptions options;
  options.backend = AttentionBackend::kCudnn;
  options.deterministic = true;
  const AttentionPattern pattern = DenseHeads(2, 8);
  for (Device device : {Device::Cpu(), Device::Cuda(0)}) {
    SCOPED_TRACE(device.ToString());
    const Tensor q =
        Empty({1, 8, 2, 64}, DType::kBFloat16, device).set_requires_grad(true);
    ExpectError([&] { Attention(q, q, q, pattern, options); },
                {"backend kCudnn with deterministic",
                 "expected backend kAuto or kOwn"});
  }
  options.backend = AttentionBackend::kAuto;
  const Tensor q = Zeros({1, 8, 2, 4});
  EXPECT_TRUE(Attention(q, q, q, pattern, options).out.defined());
}

// Attention dropout draws each pair from its own Philox counter while n,
// the number of streams and the generator offset fit 32 bits; beyond that
// draws would repeat, so Attention and the reference refuse.
TEST(AttentionErrorsTest, DropoutRefusesCountersThatWouldRepeat) {
  const Tensor q = Zeros({1, 8, 2, 4});
  const AttentionPattern pattern = DenseHeads(2, 8);
  Generator gen(1);
  gen.set_offset(uint64_t{1} << 32);
  AttentionOptions options;
  AttentionCallOptions call;
  options.dropout = 0.1;
  call.generator = &gen;
  ExpectError([&] { Attention(q, q, q, pattern, options, call); },
              {"Attention: dropout at generator offset 4294967296",
               "expected < 4294967296"});
  gen.set_offset(uint64_t{1} << 32);
  ExpectError([&] { ReferenceAttention(q, q, q, pattern, options, call); },
              {"ReferenceAttention: dropout at generator offset 4294967296"});
  gen.set_offset((uint64_t{1} << 32) - 1);
  EXPECT_TRUE(Attention(q, q, q, pattern, options, call).out.defined());
  ExpectError(
      [] {
        CheckAttentionDropoutDraws("Attention", (int64_t{1} << 32) + 1, 1, 0);
      },
      {"dropout over n = 4294967297 tokens", "expected n <= 4294967296"});
  ExpectError(
      [] {
        CheckAttentionDropoutDraws("Attention", 8, (int64_t{1} << 32) + 1, 0);
      },
      {"dropout over 4294967297 streams", "expected <= 4294967296"});
  CheckAttentionDropoutDraws("Attention", int64_t{1} << 32, int64_t{1} << 32,
                             (uint64_t{1} << 32) - 1);
}

TEST(AttentionErrorsTest, DilatedHeadPatternsRejectBadLists) {
  DilatedOptions options;
  options.segment_lengths = {8, 16};
  options.dilation_rates = {1};
  ExpectInvalid(DilatedHeadPatterns(options, 4),
                {"[8,16]", "[1]", "different lengths"});
  options.segment_lengths = {};
  options.dilation_rates = {};
  ExpectInvalid(DilatedHeadPatterns(options, 4), {"segment_lengths is empty"});
  options.segment_lengths = {8, 0};
  options.dilation_rates = {1, 2};
  ExpectInvalid(DilatedHeadPatterns(options, 4),
                {"segment length 0 at index 1", "expected >= 1"});
  options.segment_lengths = {8, 16};
  options.dilation_rates = {1, 0};
  ExpectInvalid(DilatedHeadPatterns(options, 4),
                {"dilation rate 0 at index 1", "expected >= 1"});
  options.dilation_rates = {1, 2};
  ExpectInvalid(DilatedHeadPatterns(options, 0),
                {"num_heads 0", "expected >= 1"});
}

TEST(AttentionErrorsTest, MakeBlockMaskRejectsBadOptions) {
  BlockSparseOptions options;
  options.block_size = 0;
  ExpectInvalid(MakeBlockMask(options, 64), {"block_size 0", "expected >= 1"});
  options.block_size = 8;
  ExpectInvalid(MakeBlockMask(options, 0),
                {"sequence length 0", "expected >= 1"});
  options.window = -1;
  ExpectInvalid(MakeBlockMask(options, 64), {"window -1", "expected >= 0"});
  options.window = 8;
  options.pattern = SparsePattern::kGlobalLocal;
  options.global_tokens = -3;
  ExpectInvalid(MakeBlockMask(options, 64),
                {"global_tokens -3", "expected >= 0"});
  options.pattern = SparsePattern::kDilatedSparse;
  options.stride = 0;
  ExpectInvalid(MakeBlockMask(options, 64), {"stride 0", "expected >= 1"});
  options.pattern = SparsePattern::kRandom;
  options.density = 1.5;
  ExpectInvalid(MakeBlockMask(options, 64),
                {"density 1.5", "expected in [0, 1]"});
  options.pattern = SparsePattern::kExplicit;
  options.explicit_mask.assign(9, 1);
  ExpectInvalid(
      MakeBlockMask(options, 60),
      {"explicit block mask has 9 entries", "expected 8 x 8 = 64", "n = 60"});
}

// A sequence of more blocks than a block index (int32) holds is an error
// naming the block size, not an abort in BlockMask's internal check.
TEST(AttentionErrorsTest, MakeBlockMaskRejectsMoreThanInt32MaxBlocks) {
  BlockSparseOptions options;
  options.block_size = 1;
  ExpectInvalid(MakeBlockMask(options, int64_t{1} << 31),
                {"block_size 1", "2147483648 blocks", "at most 2147483647"});
}

// An embed_dim whose [3 * embed_dim, embed_dim] projection has more than
// 2^63 elements is refused by name (its size once overflowed int64).
TEST(AttentionErrorsTest, MultiheadRejectsEmbedDimWhoseProjectionOverflows) {
  MultiheadAttentionOptions options;
  options.num_heads = 1;
  options.embed_dim = int64_t{1} << 32;
  const absl::Status status = ValidateMultiheadAttentionOptions(options);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("embed_dim 4294967296 (expected 3 * embed_dim^2"));
}

TEST(AttentionErrorsTest, ParsersNameTheChoices) {
  ExpectInvalid(ParseHeadLayout("groups"),
                {"\"groups\"", "head_groups or all_heads"});
  ExpectInvalid(ParseSparsePattern("strided"),
                {"\"strided\"", "local_window", "explicit"});
  ExpectInvalid(ParseTileOrder("zorder"),
                {"\"zorder\"", "row_major or hilbert"});
  ExpectInvalid(ParseAttentionBackend("flash"),
                {"\"flash\"", "auto, own or cudnn"});
  EXPECT_EQ(*ParseAttentionBackend("own"), AttentionBackend::kOwn);
  EXPECT_EQ(*ParseAttentionBackend("cudnn"), AttentionBackend::kCudnn);
  EXPECT_EQ(*ParseHeadLayout("all_heads"), HeadLayout::kAllHeads);
  EXPECT_EQ(*ParseSparsePattern("global_local"), SparsePattern::kGlobalLocal);
  EXPECT_EQ(*ParseTileOrder("hilbert"), TileOrder::kHilbert);
}

}  // namespace
}  // namespace lc
