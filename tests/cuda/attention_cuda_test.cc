// GPU checks of the fused CUDA attention (attention/attention_cuda.h through
// lc::Attention and the CUDA tile drivers): every pattern type (dense,
// dilated head groups and all heads, block-sparse, their intersection),
// causal and not, key padding, dropout, head_dim 64 and 128 (tensor cores)
// and 40 (FMA kernels), float64, float32 and bfloat16 against the CPU
// float64 Attention on the same inputs (out, lse and the gradients of q, k,
// v through both out and lse); multi-span layouts of the ring against the
// CPU drivers; determinism, memory, queries without keys, bad input.
#include "attention/attention_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "attention/attention.h"
#include "attention/attention_cuda_plan.h"
#include "attention/attention_driver.h"
#include "attention/attention_kernel.h"
#include "attention/attention_plan.h"
#include "attention/pattern.h"
#include "core/autograd.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/random.h"
#include "core/status.h"
#include "core/tensor.h"
#include "gtest/gtest.h"
#include "tests/attention/pattern_builders.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

const Device kGpu = Device::Cuda(0);

struct Case {
  std::string name;
  int64_t batch = 2, n = 0, heads = 0;
  AttentionPattern pattern;
  AttentionOptions options;
  AttentionCallOptions call;
};

BlockSparseOptions Sparse(SparsePattern pattern, int64_t block_size) {
  BlockSparseOptions o;
  o.pattern = pattern;
  o.block_size = block_size;
  return o;
}

Case MakeCase(std::string name, int64_t n, int64_t heads,
              AttentionPattern pattern) {
  Case c;
  c.name = std::move(name);
  c.n = n;
  c.heads = heads;
  c.pattern = std::move(pattern);
  return c;
}

// An explicit mask over `blocks` blocks: random pairs and the diagonal on,
// except the last block row, entirely off (its queries have no key).
std::vector<uint8_t> ExplicitMask(int64_t blocks, uint64_t seed) {
  Generator gen(seed);
  const std::vector<double> u = Rand({blocks, blocks}, gen).ToVector();
  std::vector<uint8_t> mask(blocks * blocks);
  for (int64_t q = 0; q < blocks; ++q) {
    for (int64_t k = 0; k < blocks; ++k) {
      mask[q * blocks + k] =
          q != blocks - 1 && (q == k || u[q * blocks + k] < 0.4);
    }
  }
  return mask;
}

// One case per pattern type and shape edge. n is never a multiple of the
// 128-row query tiles or 64-key chunks of the kernels, nor (mostly) of the
// segments and blocks, so partial tiles, short last segments and several
// key tiles per query tile all occur.
std::vector<Case> PatternCases() {
  std::vector<Case> cases;
  cases.push_back(MakeCase("dense", 300, 2, testing::DenseHeads(2, 300)));
  cases.push_back(MakeCase(
      "head_groups w{64,256} r{1,2}", 300, 4,
      testing::DilatedHeads(
          DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kHeadGroups}, 4)));
  // 5 heads in 3 groups (2, 2, 1), offsets 0, 1, 2; last segments short.
  cases.push_back(MakeCase(
      "head_groups 5 heads 3 groups", 333, 5,
      testing::DilatedHeads(
          DilatedOptions{{48, 96, 160}, {1, 2, 4}, HeadLayout::kHeadGroups},
          5)));
  // Fewer heads than groups: the last group is empty.
  cases.push_back(MakeCase(
      "head_groups 2 heads 3 groups", 200, 2,
      testing::DilatedHeads(
          DilatedOptions{{32, 64, 128}, {1, 2, 4}, HeadLayout::kHeadGroups},
          2)));
  // Several patterns per head: one launch per pattern index, merged.
  cases.push_back(MakeCase(
      "all_heads w{64,256} r{1,2}", 290, 3,
      testing::DilatedHeads(
          DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kAllHeads}, 3)));
  cases.push_back(MakeCase(
      "all_heads w{40,100,260} r{1,3,5}", 301, 5,
      testing::DilatedHeads(
          DilatedOptions{{40, 100, 260}, {1, 3, 5}, HeadLayout::kAllHeads},
          5)));
  // Long dilated segments: several 64-key chunks of stride-4 rows.
  cases.push_back(
      MakeCase("head_groups w{1024} r{4}", 1100, 2,
               testing::DilatedHeads(
                   DilatedOptions{{1024}, {4}, HeadLayout::kHeadGroups}, 2)));
  const int64_t n = 270;
  BlockSparseOptions local = Sparse(SparsePattern::kLocalWindow, 64);
  local.window = 64;
  cases.push_back(
      MakeCase("local_window", n, 2, testing::BlockSparseHeads(local, 2, n)));
  BlockSparseOptions dilated = Sparse(SparsePattern::kDilatedSparse, 32);
  dilated.stride = 2;
  cases.push_back(MakeCase("dilated_sparse", n, 2,
                           testing::BlockSparseHeads(dilated, 2, n)));
  BlockSparseOptions global = Sparse(SparsePattern::kGlobalLocal, 32);
  global.global_tokens = 32;
  global.window = 32;
  cases.push_back(
      MakeCase("global_local", n, 2, testing::BlockSparseHeads(global, 2, n)));
  BlockSparseOptions random = Sparse(SparsePattern::kRandom, 48);
  random.seed = 7;
  random.density = 0.3;
  cases.push_back(
      MakeCase("random", n, 2, testing::BlockSparseHeads(random, 2, n)));
  BlockSparseOptions explicit_mask = Sparse(SparsePattern::kExplicit, 64);
  explicit_mask.explicit_mask = ExplicitMask(5, 11);
  cases.push_back(MakeCase("explicit", n, 2,
                           testing::BlockSparseHeads(explicit_mask, 2, n)));
  // A dilated pattern intersected with a block mask (block 40).
  AttentionPattern both = testing::DilatedHeads(
      DilatedOptions{{64, 128}, {1, 2}, HeadLayout::kAllHeads}, 2);
  BlockSparseOptions window40 = Sparse(SparsePattern::kLocalWindow, 40);
  window40.window = 40;
  both.block_mask = testing::BlockSparseHeads(window40, 2, n).block_mask;
  cases.push_back(MakeCase("dilated x local_window", n, 2, both));
  return cases;
}

// Results of one Attention call and its backward, on the CPU in float64.
struct Results {
  Tensor out, lse, dq, dk, dv;
};

// Inputs in float64 holding values exactly representable in `dtype`, so
// that the CPU reference and the device see the same numbers.
struct Inputs {
  Tensor q, k, v, grad_out, grad_lse;
};

Inputs MakeInputs(const Case& c, int64_t head_dim, DType dtype, uint64_t seed) {
  const Shape shape = {c.batch, c.n, c.heads, head_dim};
  Inputs in;
  in.q = RandomNormal(shape, dtype, Device::Cpu(), seed).to(DType::kFloat64);
  in.k =
      RandomNormal(shape, dtype, Device::Cpu(), seed + 1).to(DType::kFloat64);
  in.v =
      RandomNormal(shape, dtype, Device::Cpu(), seed + 2).to(DType::kFloat64);
  in.grad_out =
      RandomNormal(shape, dtype, Device::Cpu(), seed + 3).to(DType::kFloat64);
  in.grad_lse = RandomNormal({c.batch, c.heads, c.n}, DType::kFloat32,
                             Device::Cpu(), seed + 4)
                    .to(DType::kFloat64);
  return in;
}

// Attention of `in` in `dtype` on `device`, then backward through out and
// lse; every result copied to the CPU in float64. Dropout draws from a fresh
// Generator(dropout_seed), so every run sees the same mask.
Results RunAttention(const Case& c, const Inputs& in, DType dtype,
                     Device device, uint64_t dropout_seed = 5,
                     bool through_lse = true) {
  const DType stat = dtype == DType::kFloat64 ? dtype : DType::kFloat32;
  Generator gen(dropout_seed);
  AttentionCallOptions call = c.call;
  call.generator = &gen;
  auto leaf = [&](const Tensor& t) {
    return t.to(dtype).to(device).detach().set_requires_grad(true);
  };
  const Tensor q = leaf(in.q), k = leaf(in.k), v = leaf(in.v);
  AttentionResult r = Attention(q, k, v, c.pattern, c.options, call);
  EXPECT_EQ(r.out.dtype(), dtype) << c.name;
  EXPECT_EQ(r.lse.dtype(), stat) << c.name;
  EXPECT_EQ(r.out.device(), device) << c.name;
  if (through_lse) {
    Backward({r.out, r.lse}, {in.grad_out.to(dtype).to(device),
                              in.grad_lse.to(stat).to(device)});
  } else {
    Backward({r.out}, {in.grad_out.to(dtype).to(device)});
  }
  auto host = [](const Tensor& t) {
    return t.to(Device::Cpu()).to(DType::kFloat64);
  };
  return {host(r.out), host(r.lse), host(q.grad()), host(k.grad()),
          host(v.grad())};
}

void ExpectClose(const Results& got, const Results& want, double rtol,
                 const std::string& what) {
  ExpectCudaClose(got.out, want.out, rtol, what + " out");
  ExpectCudaClose(got.lse, want.lse, rtol, what + " lse");
  ExpectCudaClose(got.dq, want.dq, rtol, what + " dq");
  ExpectCudaClose(got.dk, want.dk, rtol, what + " dk");
  ExpectCudaClose(got.dv, want.dv, rtol, what + " dv");
}

// The device result of `c` in `dtype` against the CPU float64 result on the
// same (dtype-rounded) inputs.
// (through_lse: the gradients flow from lse too, else from out only.)
void ExpectMatchesCpu(const Case& c, int64_t head_dim, DType dtype,
                      uint64_t seed, double rtol, bool through_lse = true) {
  const Inputs in = MakeInputs(c, head_dim, dtype, seed);
  const Results want =
      RunAttention(c, in, DType::kFloat64, Device::Cpu(), 5, through_lse);
  const Results got = RunAttention(c, in, dtype, kGpu, 5, through_lse);
  ExpectClose(got, want, rtol,
              c.name + " " + DTypeName(dtype) + " d" +
                  std::to_string(head_dim) +
                  (c.options.causal ? " causal" : "") +
                  (through_lse ? "" : " (gradient through out only)"));
}

// bfloat16: 2e-2 relative. The reference sees the same bfloat16-rounded
// inputs; the kernels round p and ds to bfloat16 (2^-9 relative) before
// the products that use them and round out and the gradients to bfloat16.
constexpr double kBf16Tolerance = 2e-2;

TEST_F(CudaTest, AttentionEveryPatternMatchesCpuInFloat64) {
  uint64_t seed = 100;
  for (bool causal : {false, true}) {
    for (Case c : PatternCases()) {
      c.options.causal = causal;
      // head_dim 40: the FMA kernels (float64 always runs there).
      ExpectMatchesCpu(c, 40, DType::kFloat64, seed += 10,
                       CudaRelativeTolerance(DType::kFloat64));
    }
  }
}

// Sets the tensor-core kernels for one scope (the previous ones after it).
class ScopedTensorCoreKernels {
 public:
  explicit ScopedTensorCoreKernels(CudaTensorCoreKernels kernels)
      : previous_(GetCudaTensorCoreKernels()) {
    SetCudaTensorCoreKernels(kernels);
  }
  ~ScopedTensorCoreKernels() { SetCudaTensorCoreKernels(previous_); }

 private:
  CudaTensorCoreKernels previous_;
};

// Both tensor-core families: the mma.sync kernels and (on a Hopper GPU)
// the wgmma ones.
constexpr CudaTensorCoreKernels kTensorCoreFamilies[] = {
    CudaTensorCoreKernels::kMmaSync, CudaTensorCoreKernels::kWgmma};

TEST_F(CudaTest, AttentionEveryPatternMatchesCpuInBFloat16OnTensorCores) {
  uint64_t seed = 200;
  for (CudaTensorCoreKernels kernels : kTensorCoreFamilies) {
    ScopedTensorCoreKernels scoped(kernels);
    for (int64_t head_dim : {64, 128}) {
      for (bool causal : {false, true}) {
        for (Case c : PatternCases()) {
          c.options.causal = causal;
          c.options.backend = AttentionBackend::kOwn;
          c.name +=
              kernels == CudaTensorCoreKernels::kMmaSync ? " (mma.sync)" : "";
          ExpectMatchesCpu(c, head_dim, DType::kBFloat16, seed += 10,
                           kBf16Tolerance);
        }
      }
    }
  }
}

TEST_F(CudaTest, AttentionFloat32AndOddHeadDimsMatchCpu) {
  uint64_t seed = 300;
  for (bool causal : {false, true}) {
    for (Case c : PatternCases()) {
      c.options.causal = causal;
      ExpectMatchesCpu(c, 64, DType::kFloat32, seed += 10,
                       CudaRelativeTolerance(DType::kFloat32));
    }
  }
  // bfloat16 with head dims the tensor-core kernels do not take: the FMA
  // kernels in float32.
  Case dilated = MakeCase(
      "all_heads odd d", 290, 3,
      testing::DilatedHeads(
          DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kAllHeads}, 3));
  for (int64_t head_dim : {8, 40, 96, 200}) {
    ExpectMatchesCpu(dilated, head_dim, DType::kBFloat16, seed += 10,
                     kBf16Tolerance);
  }
}

TEST_F(CudaTest, AttentionKeyPaddingMatchesCpuWithMaskOnEitherDevice) {
  uint64_t seed = 400;
  for (Device mask_device : {Device::Cpu(), kGpu}) {
    for (Case c :
         {MakeCase("dense padded", 300, 2, testing::DenseHeads(2, 300)),
          MakeCase(
              "head_groups padded", 300, 4,
              testing::DilatedHeads(
                  DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kHeadGroups},
                  4))}) {
      // Random padding, and batch element 1 padded entirely: its queries
      // get no key (out 0, lse -inf).
      Generator gen(seed);
      const std::vector<double> u = Rand({c.batch, c.n}, gen).ToVector();
      std::vector<double> bits(u.size());
      for (size_t i = 0; i < u.size(); ++i) {
        bits[i] = i >= static_cast<size_t>(c.n) || u[i] < 0.3;
      }
      c.call.key_padding_mask =
          FromVector(bits, {c.batch, c.n}, DType::kUInt8, mask_device);
      for (bool causal : {false, true}) {
        c.options.causal = causal;
        ExpectMatchesCpu(c, 40, DType::kFloat64, seed += 10,
                         CudaRelativeTolerance(DType::kFloat64));
        for (CudaTensorCoreKernels kernels : kTensorCoreFamilies) {
          ScopedTensorCoreKernels scoped(kernels);
          ExpectMatchesCpu(c, 64, DType::kBFloat16, seed += 10, kBf16Tolerance);
        }
      }
    }
  }
}

// The dropout mask is the CPU's (same generator state): equal results.
TEST_F(CudaTest, AttentionDropoutMatchesCpuMask) {
  uint64_t seed = 500;
  for (Case c :
       {MakeCase("dense dropout", 300, 2, testing::DenseHeads(2, 300)),
        MakeCase("all_heads dropout", 290, 3,
                 testing::DilatedHeads(
                     DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kAllHeads},
                     3))}) {
    c.options.dropout = 0.2;
    for (bool causal : {false, true}) {
      c.options.causal = causal;
      ExpectMatchesCpu(c, 40, DType::kFloat64, seed += 10,
                       CudaRelativeTolerance(DType::kFloat64));
      for (CudaTensorCoreKernels kernels : kTensorCoreFamilies) {
        ScopedTensorCoreKernels scoped(kernels);
        ExpectMatchesCpu(c, 64, DType::kBFloat16, seed += 10, kBf16Tolerance);
        ExpectMatchesCpu(c, 128, DType::kBFloat16, seed += 10, kBf16Tolerance);
      }
    }
  }
}

// Non-contiguous q, k, v (views of [batch, heads, n, head_dim] buffers).
TEST_F(CudaTest, AttentionTakesNonContiguousInputs) {
  Case c = MakeCase(
      "head_groups", 300, 4,
      testing::DilatedHeads(
          DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kHeadGroups}, 4));
  c.options.causal = true;
  const Inputs in = MakeInputs(c, 64, DType::kBFloat16, 600);
  const Results want = RunAttention(c, in, DType::kFloat64, Device::Cpu());
  auto strided = [](const Tensor& t) {
    // The same values through a permuted copy and back: a strided view.
    return t.to(DType::kBFloat16)
        .to(kGpu)
        .permute({0, 2, 1, 3})
        .contiguous()
        .permute({0, 2, 1, 3});
  };
  const Tensor q = strided(in.q).detach().set_requires_grad(true);
  const Tensor k = strided(in.k).detach().set_requires_grad(true);
  const Tensor v = strided(in.v).detach().set_requires_grad(true);
  ASSERT_FALSE(q.is_contiguous());
  AttentionResult r = Attention(q, k, v, c.pattern, c.options, c.call);
  Backward({r.out, r.lse}, {in.grad_out.to(DType::kBFloat16).to(kGpu),
                            in.grad_lse.to(DType::kFloat32).to(kGpu)});
  ExpectCudaClose(r.out, want.out, kBf16Tolerance, "strided out");
  ExpectCudaClose(r.lse, want.lse, kBf16Tolerance, "strided lse");
  ExpectCudaClose(q.grad(), want.dq, kBf16Tolerance, "strided dq");
  ExpectCudaClose(k.grad(), want.dk, kBf16Tolerance, "strided dk");
  ExpectCudaClose(v.grad(), want.dv, kBf16Tolerance, "strided dv");
}

bool BitwiseEqual(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.ToVector(), y = b.ToVector();
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!(x[i] == y[i]) && !(std::isnan(x[i]) && std::isnan(y[i]))) {
      return false;
    }
  }
  return true;
}

TEST_F(CudaTest, AttentionIsDeterministic) {
  Case c = MakeCase(
      "all_heads", 1100, 3,
      testing::DilatedHeads(
          DilatedOptions{{256, 1024}, {1, 2}, HeadLayout::kAllHeads}, 3));
  c.options.causal = true;
  c.options.dropout = 0.1;
  for (DType dtype : {DType::kBFloat16, DType::kFloat32}) {
    const Inputs in = MakeInputs(c, 64, dtype, 700);
    const Results a = RunAttention(c, in, dtype, kGpu);
    const Results b = RunAttention(c, in, dtype, kGpu);
    EXPECT_TRUE(BitwiseEqual(a.out, b.out)) << DTypeName(dtype);
    EXPECT_TRUE(BitwiseEqual(a.lse, b.lse)) << DTypeName(dtype);
    EXPECT_TRUE(BitwiseEqual(a.dq, b.dq)) << DTypeName(dtype);
    EXPECT_TRUE(BitwiseEqual(a.dk, b.dk)) << DTypeName(dtype);
    EXPECT_TRUE(BitwiseEqual(a.dv, b.dv)) << DTypeName(dtype);
  }
}

// A query block whose mask row is off: out 0, lse -inf, no gradient; the
// other rows are unaffected.
TEST_F(CudaTest, AttentionQueryWithoutKeysGivesZeroOutNegInfLseNoGradient) {
  const int64_t n = 270;
  BlockSparseOptions o = Sparse(SparsePattern::kExplicit, 64);
  o.explicit_mask = ExplicitMask(5, 13);
  const Case c = MakeCase("explicit", n, 2, testing::BlockSparseHeads(o, 2, n));
  for (auto [dtype, head_dim] :
       {std::pair<DType, int64_t>{DType::kBFloat16, 64},
        {DType::kBFloat16, 128},
        {DType::kFloat64, 40}}) {
    const Inputs in = MakeInputs(c, head_dim, dtype, 800);
    const Results r = RunAttention(c, in, dtype, kGpu);
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t t = 4 * 64; t < n; ++t) {
        for (int64_t h = 0; h < c.heads; ++h) {
          EXPECT_EQ(r.lse.at({b, h, t}),
                    -std::numeric_limits<double>::infinity());
          for (int64_t i = 0; i < head_dim; ++i) {
            ASSERT_EQ(r.out.at({b, t, h, i}), 0.0) << t;
            ASSERT_EQ(r.dq.at({b, t, h, i}), 0.0) << t;
          }
        }
      }
    }
    EXPECT_TRUE(std::isfinite(r.lse.at({0, 0, 0})));
  }
}

// Forward + backward of dilated bfloat16 attention over 32,768 tokens (one
// pattern per head: the kernels write out and the gradients in bfloat16)
// holds little beyond out and the three gradients (4 x the bytes of q):
// lse, delta, the work lists and the engine's own gradient buffers, where
// float32 accumulators alone would take 6 x and one [n, n] float32 score
// matrix 4 GiB.
TEST_F(CudaTest, AttentionMemoryIsLinearInN) {
  const int64_t batch = 1, n = 32768, heads = 4, head_dim = 64;
  const AttentionPattern pattern = testing::DilatedHeads(
      DilatedOptions{{2048, 4096, 8192}, {1, 2, 4}, HeadLayout::kHeadGroups},
      heads);
  const Shape shape = {batch, n, heads, head_dim};
  const Tensor q =
      RandomNormal(shape, DType::kBFloat16, kGpu, 900).set_requires_grad(true);
  const Tensor k =
      RandomNormal(shape, DType::kBFloat16, kGpu, 901).set_requires_grad(true);
  const Tensor v =
      RandomNormal(shape, DType::kBFloat16, kGpu, 902).set_requires_grad(true);
  const Tensor grad = RandomNormal(shape, DType::kBFloat16, kGpu, 903);
  MemoryTracker& tracker = DeviceMemoryTracker(kGpu);
  SynchronizeCudaStream(0);
  tracker.Reset();
  const int64_t before = tracker.stats().current_bytes;
  {
    AttentionResult r = Attention(q, k, v, pattern, {});
    r.out.backward(grad);
  }
  const int64_t peak_extra = tracker.stats().peak_bytes - before;
  const int64_t tensor_bytes = batch * n * heads * head_dim * 2;
  EXPECT_LE(peak_extra, 6 * tensor_bytes)
      << "peak extra " << peak_extra << " bytes";
  EXPECT_LT(peak_extra, n * n * 4 / 16);
}

// Keys [range.begin, range.end) packed per head as ring attention ships
// them: for each pattern of the head, only the positions it selects, one
// strided span per segment, rows counting from the head's first row.
TokenLayout PackedKeys(const AttentionPattern& pattern, int64_t n,
                       PositionSpan range) {
  const int64_t heads = pattern.head_patterns.size();
  TokenLayout layout;
  layout.head_spans.resize(heads);
  layout.head_row.resize(heads);
  for (int64_t h = 0; h < heads; ++h) {
    layout.head_row[h] = layout.rows;
    int64_t row = 0;
    const std::vector<DilatedPattern>& patterns = pattern.head_patterns[h];
    for (size_t i = 0; i < patterns.size(); ++i) {
      const int64_t w = patterns[i].segment_length;
      const int64_t r = patterns[i].dilation_rate;
      for (int64_t seg = range.begin / w; seg * w < range.end; ++seg) {
        const int64_t lo = std::max(range.begin, seg * w);
        const int64_t hi = std::min({range.end, n, seg * w + w});
        const int64_t selected = seg * w + patterns[i].offset;
        const int64_t first = lo <= selected
                                  ? selected
                                  : selected + (lo - selected + r - 1) / r * r;
        if (first >= hi) continue;
        layout.head_spans[h].push_back(
            LocalSpan{first, hi, row, r, static_cast<int>(i)});
        row += (hi - first + r - 1) / r;
      }
    }
    layout.rows += row;
  }
  return layout;
}

// The CUDA drivers on the layouts of ring attention (a zigzag rank's two
// chunks against another rank's two chunks, and against keys packed per
// head): the same accumulations as the CPU drivers, forward and backward.
TEST_F(CudaTest, CudaDriversMatchCpuDriversOnRingLayouts) {
  const int64_t batch = 2, n = 1000, heads = 3;
  const AttentionPattern pattern = testing::DilatedHeads(
      DilatedOptions{{128, 512}, {1, 2}, HeadLayout::kAllHeads}, heads);
  const TokenLayout ql = TokenLayoutOf({{100, 350}, {650, 900}});
  const TokenLayout zigzag = TokenLayoutOf({{0, 250}, {750, 1000}});
  const TokenLayout packed = PackedKeys(pattern, n, {600, 1000});
  ASSERT_TRUE(packed.packed());
  for (const TokenLayout* kl : {&zigzag, &packed}) {
    for (auto [dtype, head_dim] :
         {std::pair<DType, int64_t>{DType::kFloat64, 40},
          {DType::kBFloat16, 64}}) {
      const std::string what =
          std::string(kl->packed() ? "packed " : "") + DTypeName(dtype) + " ";
      const DType acc = dtype == DType::kFloat64 ? dtype : DType::kFloat32;
      const double rtol = dtype == DType::kFloat64
                              ? CudaRelativeTolerance(dtype)
                              : kBf16Tolerance;
      auto random = [&](const Shape& shape, uint64_t seed) {
        return RandomNormal(shape, dtype, Device::Cpu(), seed)
            .to(DType::kFloat64);
      };
      const Shape q_shape = {batch, ql.rows, heads, head_dim};
      const Shape k_shape = kl->packed()
                                ? Shape{batch, kl->rows, head_dim}
                                : Shape{batch, kl->rows, heads, head_dim};
      const Tensor q = random(q_shape, 1000), g = random(q_shape, 1001);
      const Tensor k = random(k_shape, 1002), v = random(k_shape, 1003);
      const Tensor g_lse = random({batch, heads, ql.rows}, 1004);
      AttentionOptions options;
      options.causal = true;
      // The problem takes its geometry from q (k and v of the whole call
      // have q's shape).
      const auto cpu = MakeAttentionProblem(SpecOf(q), n, pattern, options);
      const Tensor qd = q.to(dtype).to(kGpu), kd = k.to(dtype).to(kGpu),
                   vd = v.to(dtype).to(kGpu), gd = g.to(dtype).to(kGpu);
      const auto gpu = MakeAttentionProblem(SpecOf(qd), n, pattern, options);
      const AttentionDriver& cpu_driver = CpuAttentionDriver();
      const AttentionDriver& gpu_driver = CudaAttentionDriver();
      gpu_driver.Prepare(*gpu, ql, *kl);
      const AttentionCall call;

      // CPU: forward, then backward with the final lse.
      Tensor out = Zeros(q_shape, DType::kFloat64);
      Tensor lse =
          Full({batch, heads, ql.rows},
               -std::numeric_limits<double>::infinity(), DType::kFloat64);
      cpu_driver.Forward(*cpu, call, ql, q, *kl, k, v, out, lse);
      Tensor delta = Empty({batch, heads, ql.rows}, DType::kFloat64);
      cpu_driver.RowDelta(*cpu, out, g, delta);
      Tensor dq = Zeros(q_shape, DType::kFloat64);
      Tensor dk = Zeros(k_shape, DType::kFloat64);
      Tensor dv = Zeros(k_shape, DType::kFloat64);
      cpu_driver.Backward(*cpu, call, ql, q, *kl, k, v, g, lse, delta, g_lse,
                          dq, dk, dv);
      double norm = 0;
      for (double x : dk.ToVector()) norm += x * x;
      ASSERT_GT(norm, 0) << what << "(the layouts must meet)";

      // GPU: the same calls on the device; delta from the CPU out (in the
      // inputs' dtype) so both backward passes see one delta.
      Tensor out_d = Zeros(q_shape, acc, kGpu);
      Tensor lse_d = Full({batch, heads, ql.rows},
                          -std::numeric_limits<double>::infinity(), acc, kGpu);
      gpu_driver.Forward(*gpu, call, ql, qd, *kl, kd, vd, out_d, lse_d);
      ExpectCudaClose(out_d, out, rtol, what + "out");
      ExpectCudaClose(lse_d, lse, rtol, what + "lse");
      Tensor delta_d = Empty({batch, heads, ql.rows}, acc, kGpu);
      gpu_driver.RowDelta(*gpu, out.to(dtype).to(kGpu), gd, delta_d);
      Tensor dq_d = Zeros(q_shape, acc, kGpu);
      Tensor dk_d = Zeros(k_shape, acc, kGpu);
      Tensor dv_d = Zeros(k_shape, acc, kGpu);
      gpu_driver.Backward(*gpu, call, ql, qd, *kl, kd, vd, gd,
                          lse.to(acc).to(kGpu), delta_d, g_lse.to(acc).to(kGpu),
                          dq_d, dk_d, dv_d);
      ExpectCudaClose(dq_d, dq, rtol, what + "dq");
      ExpectCudaClose(dk_d, dk, rtol, what + "dk");
      ExpectCudaClose(dv_d, dv, rtol, what + "dv");
    }
  }
}

// Buffers whose bases are 16-byte aligned but whose rows are not all:
// q, k, v, grad_out and the accumulators are columns [0, heads * 64) of
// [batch, n, heads * 64 + 4] buffers, so every other row starts 8 bytes off
// a 16-byte boundary. The launchers send them to the FMA kernels (the
// tensor-core kernels' 16-byte copies would fault): forward, and backward
// through lse, match the CPU.
TEST_F(CudaTest, AttentionKernelsTakeRowsThatAreNotAllAligned) {
  const int64_t batch = 2, n = 200, heads = 2, head_dim = 64;
  const int64_t width = heads * head_dim + 4;
  const Shape wide = {batch, n, width};
  const AttentionPattern pattern = testing::DilatedHeads(
      DilatedOptions{{64, 128}, {1, 2}, HeadLayout::kAllHeads}, heads);
  auto columns = [&](const Tensor& t) {
    return t.slice(2, 0, heads * head_dim)
        .contiguous()
        .view({batch, n, heads, head_dim});
  };
  const Tensor qw = RandomNormal(wide, DType::kBFloat16, kGpu, 1);
  const Tensor kw = RandomNormal(wide, DType::kBFloat16, kGpu, 2);
  const Tensor vw = RandomNormal(wide, DType::kBFloat16, kGpu, 3);
  const Tensor grad_lse =
      RandomNormal({batch, heads, n}, DType::kFloat32, kGpu, 4);
  AttentionOptions options;
  options.causal = true;

  // The CPU in float64 on the same values; gradients through lse alone.
  auto leaf = [&](const Tensor& t) {
    return columns(t)
        .to(Device::Cpu())
        .to(DType::kFloat64)
        .detach()
        .set_requires_grad(true);
  };
  const Tensor q = leaf(qw), k = leaf(kw), v = leaf(vw);
  const AttentionResult want = Attention(q, k, v, pattern, options);
  Backward({want.lse}, {grad_lse.to(Device::Cpu()).to(DType::kFloat64)});

  const Tensor qd = columns(qw), kd = columns(kw), vd = columns(vw);
  const auto p = MakeAttentionProblem(SpecOf(qd), n, pattern, options);
  const TokenLayout all = TokenLayoutOf({PositionSpan{0, n}});
  p->cuda_work_lists->Prepare(*p, all, all);
  CudaAttentionArgs args;
  args.dtype = DType::kBFloat16;
  args.out_dtype = DType::kFloat32;
  args.batch = batch;
  args.n = n;
  args.heads = heads;
  args.head_dim = head_dim;
  args.q_rows = n;
  args.q_batch_stride = args.k_batch_stride = n * width;
  args.q_row_stride = args.k_row_stride = width;
  args.k_head_stride = head_dim;
  args.max_patterns = p->max_patterns;
  args.scale = p->scale;
  args.causal = true;
  const CudaWorkList& queries =
      p->cuda_work_lists->Get(all, all, CudaWorkKind::kQueryItems);
  const CudaWorkList& keys =
      p->cuda_work_lists->Get(all, all, CudaWorkKind::kKeyItems);
  const Tensor out = Zeros(wide, DType::kFloat32, kGpu);
  const Tensor lse =
      Full({batch, heads, n}, -std::numeric_limits<double>::infinity(),
           DType::kFloat32, kGpu);
  LaunchAttentionForward(args, queries, qw.raw_data(), kw.raw_data(),
                         vw.raw_data(), out.raw_data(), lse.raw_data());
  const double rtol = CudaRelativeTolerance(DType::kFloat32);
  ExpectCudaClose(columns(out), want.out, rtol, "out");
  ExpectCudaClose(lse, want.lse, rtol, "lse");

  // With grad_out = 0 (so delta = 0) only lse's gradient flows.
  const Tensor grad_out = Zeros(wide, DType::kBFloat16, kGpu);
  const Tensor delta = Zeros({batch, heads, n}, DType::kFloat32, kGpu);
  const Tensor dq = Zeros(wide, DType::kFloat32, kGpu);
  const Tensor dk = Zeros(wide, DType::kFloat32, kGpu);
  const Tensor dv = Zeros(wide, DType::kFloat32, kGpu);  // stays 0
  LaunchAttentionBackward(args, queries, keys, qw.raw_data(), kw.raw_data(),
                          vw.raw_data(), grad_out.raw_data(), lse.raw_data(),
                          delta.raw_data(), grad_lse.raw_data(), dq.raw_data(),
                          dk.raw_data(), dv.raw_data());
  ExpectCudaClose(columns(dq), q.grad(), rtol, "dq");
  ExpectCudaClose(columns(dk), k.grad(), rtol, "dk");
}

void ExpectError(const std::function<void()>& fn,
                 const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected lc::Error with " << parts[0];
  } catch (const Error& e) {
    const std::string message(e.status().message());
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << message;
    }
  }
}

TEST_F(CudaTest, AttentionBadInputOnCudaIsAClearError) {
  const Shape shape = {1, 16, 2, 8};
  const AttentionPattern pattern = testing::DenseHeads(2, 16);
  const Tensor gpu = Zeros(shape, DType::kFloat32, kGpu);
  const Tensor cpu = Zeros(shape, DType::kFloat32);
  ExpectError([&] { Attention(gpu, cpu, gpu, pattern); },
              {"k on cpu", "expected one device"});
  ExpectError([&] { Attention(cpu, gpu, gpu, pattern); },
              {"q on cpu", "expected one device"});
  const Tensor wide = Zeros({1, 16, 2, 300}, DType::kBFloat16, kGpu);
  ExpectError([&] { Attention(wide, wide, wide, pattern); },
              {"head_dim 300", "expected 1 to 256"});
  const Tensor half = Zeros(shape, DType::kBFloat16, kGpu);
  ExpectError([&] { Attention(gpu, half, gpu, pattern); },
              {"dtypes float32, bfloat16", "expected one dtype"});
  AttentionOptions options;
  AttentionCallOptions call;
  call.key_padding_mask = Zeros({1, 15}, DType::kUInt8, kGpu);
  ExpectError([&] { Attention(gpu, gpu, gpu, pattern, options, call); },
              {"key_padding_mask", "expected uint8 [1, 16]"});
}

// Calls cuDNN runs: one pattern per head, segments dividing n (dense is
// one segment of n), bfloat16, no dropout, mask or padding.
std::vector<Case> CudnnCases() {
  return {
      MakeCase("cudnn dense", 320, 2, testing::DenseHeads(2, 320)),
      MakeCase(
          "cudnn head_groups w{64,256} r{1,2}", 512, 4,
          testing::DilatedHeads(
              DilatedOptions{{64, 256}, {1, 2}, HeadLayout::kHeadGroups}, 4)),
      // 5 heads in groups of 2, 2, 1 with offsets 0, 1, 2.
      MakeCase(
          "cudnn head_groups 5 heads 3 groups", 480, 5,
          testing::DilatedHeads(
              DilatedOptions{{48, 96, 160}, {1, 2, 4}, HeadLayout::kHeadGroups},
              5)),
      // A rate that does not divide the segment: 342 rows per segment.
      MakeCase("cudnn head_groups w{1024} r{3}", 2048, 2,
               testing::DilatedHeads(
                   DilatedOptions{{1024}, {3}, HeadLayout::kHeadGroups}, 2)),
  };
}

// cuDNN's fused attention against the CPU in float64: out, lse and the
// gradients through out (kCudnn), and through lse too (kAuto: cuDNN's
// forward, our backward, which takes lse's gradient).
TEST_F(CudaTest, AttentionOnCudnnMatchesCpu) {
  for (int64_t head_dim : {64, 128}) {
    for (bool causal : {false, true}) {
      for (Case c : CudnnCases()) {
        c.options.causal = causal;
        const uint64_t seed =
            SeedOfCase(c.name + std::to_string(head_dim) + (causal ? "c" : ""));
        c.options.backend = AttentionBackend::kCudnn;
        ExpectMatchesCpu(c, head_dim, DType::kBFloat16, seed, kBf16Tolerance,
                         /*through_lse=*/false);
        c.options.backend = AttentionBackend::kAuto;
        ExpectMatchesCpu(c, head_dim, DType::kBFloat16, seed + 1,
                         kBf16Tolerance, /*through_lse=*/true);
      }
    }
  }
}

// With deterministic, kAuto runs cuDNN's forward and our backward: equal
// inputs give bit-identical gradients; kCudnn refuses it before running the
// forward.
TEST_F(CudaTest, AttentionOnCudnnWithDeterministicRunsOurBackward) {
  for (bool causal : {false, true}) {
    Case c = CudnnCases()[1];
    c.options.causal = causal;
    c.options.deterministic = true;
    const Inputs in = MakeInputs(c, 64, DType::kBFloat16, 900);
    const Results a = RunAttention(c, in, DType::kBFloat16, kGpu, 5, false);
    const Results b = RunAttention(c, in, DType::kBFloat16, kGpu, 5, false);
    EXPECT_TRUE(BitwiseEqual(a.dq, b.dq)) << causal;
    EXPECT_TRUE(BitwiseEqual(a.dk, b.dk)) << causal;
    EXPECT_TRUE(BitwiseEqual(a.dv, b.dv)) << causal;
    ExpectMatchesCpu(c, 64, DType::kBFloat16, 901, kBf16Tolerance, false);
    c.options.backend = AttentionBackend::kCudnn;
    const Tensor q = in.q.to(DType::kBFloat16).to(kGpu);
    ExpectError([&] { Attention(q, q, q, c.pattern, c.options, c.call); },
                {"backend kCudnn with deterministic"});
  }
}

// Fails every allocation above `limit` bytes, like a device that is full.
class CappedAllocator : public Allocator {
 public:
  CappedAllocator(Allocator* base, int64_t limit)
      : base_(base), limit_(limit) {}
  void* Allocate(int64_t bytes, Device device) override {
    if (bytes > limit_) {
      throw Error(absl::ResourceExhaustedError(
          absl::StrCat("test cap: ", bytes, " bytes")));
    }
    return base_->Allocate(bytes, device);
  }
  void Deallocate(void* ptr, int64_t bytes, Device device) override {
    base_->Deallocate(ptr, bytes, device);
  }

 private:
  Allocator* base_;
  int64_t limit_;
};

// When cuDNN's backward workspace (a float32 dq, 2 MiB here) does not fit,
// kAuto runs our backward instead; kCudnn reports the shortage.
TEST_F(CudaTest, AttentionOnCudnnFallsBackWhenItsWorkspaceDoesNotFit) {
  Case c =
      MakeCase("cudnn dense capped", 4096, 2, testing::DenseHeads(2, 4096));
  c.batch = 1;
  const Inputs in = MakeInputs(c, 64, DType::kBFloat16, 950);
  const Results want = RunAttention(c, in, DType::kFloat64, Device::Cpu(), 5,
                                    /*through_lse=*/false);
  CappedAllocator capped(GetAllocator(kGpu), int64_t{3} << 19);  // 1.5 MiB
  SetAllocator(DeviceType::kCuda, &capped);
  const Results got = RunAttention(c, in, DType::kBFloat16, kGpu, 5, false);
  c.options.backend = AttentionBackend::kCudnn;
  ExpectError([&] { RunAttention(c, in, DType::kBFloat16, kGpu, 5, false); },
              {"test cap"});
  SetAllocator(DeviceType::kCuda, nullptr);
  ExpectClose(got, want, kBf16Tolerance, c.name);
}

// Data that does not start on a 16-byte boundary (a contiguous view one
// element into its storage): kAuto runs ours, bit for bit what kOwn gives,
// and kCudnn names the alignment.
TEST_F(CudaTest, AttentionOnCudnnNeedsAlignedData) {
  const int64_t n = 256, heads = 2, head_dim = 64;
  const int64_t numel = n * heads * head_dim;
  const Shape shape = {1, n, heads, head_dim};
  auto misaligned = [&](uint64_t seed) {
    return RandomNormal({numel + 1}, DType::kBFloat16, kGpu, seed)
        .slice(0, 1, numel + 1)
        .view(shape);
  };
  const Tensor q = misaligned(1), k = misaligned(2), v = misaligned(3);
  const Tensor grad = RandomNormal(shape, DType::kBFloat16, kGpu, 4);
  ASSERT_TRUE(q.is_contiguous());
  const AttentionPattern dense = testing::DenseHeads(heads, n);
  auto run = [&](AttentionBackend backend) {
    AttentionOptions options;
    options.backend = backend;
    const Tensor qg = q.detach().set_requires_grad(true);
    const Tensor kg = k.detach().set_requires_grad(true);
    const Tensor vg = v.detach().set_requires_grad(true);
    const AttentionResult r = Attention(qg, kg, vg, dense, options);
    r.out.backward(grad);
    std::vector<Tensor> results;
    for (const Tensor& t : {r.out, r.lse, qg.grad(), kg.grad(), vg.grad()}) {
      results.push_back(t.to(Device::Cpu()).to(DType::kFloat64));
    }
    return results;
  };
  const std::vector<Tensor> own = run(AttentionBackend::kOwn);
  const std::vector<Tensor> automatic = run(AttentionBackend::kAuto);
  for (size_t i = 0; i < own.size(); ++i) {
    EXPECT_TRUE(BitwiseEqual(own[i], automatic[i])) << "result " << i;
  }
  ExpectError([&] { run(AttentionBackend::kCudnn); }, {"16-byte aligned data"});
}

// kCudnn names what cuDNN does not run; kAuto runs ours for those calls
// (the other tests check its results).
TEST_F(CudaTest, AttentionOnCudnnRefusesWhatItCannotRun) {
  const Shape shape = {1, 300, 2, 64};
  const Tensor x = Zeros(shape, DType::kBFloat16, kGpu);
  AttentionOptions options;
  options.backend = AttentionBackend::kCudnn;
  ExpectError(
      [&] {
        Attention(x, x, x,
                  testing::DilatedHeads(
                      DilatedOptions{{64}, {1}, HeadLayout::kHeadGroups}, 2),
                  options);
      },
      {"segment length 64 does not divide n = 300"});
  ExpectError(
      [&] {
        Attention(
            x, x, x,
            testing::DilatedHeads(
                DilatedOptions{{100, 300}, {1, 2}, HeadLayout::kAllHeads}, 2),
            options);
      },
      {"2 dilated patterns"});
  const AttentionPattern dense = testing::DenseHeads(2, 300);
  const Tensor f32 = Zeros(shape, DType::kFloat32, kGpu);
  ExpectError([&] { Attention(f32, f32, f32, dense, options); },
              {"inputs are float32", "it takes bfloat16"});
  const Tensor odd = Zeros({1, 300, 2, 36}, DType::kBFloat16, kGpu);
  ExpectError([&] { Attention(odd, odd, odd, dense, options); },
              {"head_dim 36"});
  AttentionOptions dropout = options;
  dropout.dropout = 0.1;
  ExpectError([&] { Attention(x, x, x, dense, dropout); }, {"dropout 0.1"});
  // The gradient through lse: cuDNN's backward does not take it.
  const Tensor q = RandomNormal(shape, DType::kBFloat16, kGpu, 1)
                       .detach()
                       .set_requires_grad(true);
  AttentionResult r = Attention(q, q, q, dense, options);
  ExpectError(
      [&] { Backward({r.lse}, {Ones(r.lse.shape(), r.lse.dtype(), kGpu)}); },
      {"kCudnn has no backward that takes a gradient through lse"});
}

}  // namespace
}  // namespace lc
