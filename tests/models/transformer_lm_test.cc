// The transformer language model: loss, logits and every parameter gradient
// against the same model written with libtorch (also with a sliding window
// and soft-capping); context parallelism on k thread ranks against one rank;
// recomputation against stored activations (results and peak memory);
// parameter names; configuration and input errors.
#include "models/transformer_lm.h"

#include <chrono>
#include <cmath>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/attention_config.h"
#include "attention/reference_attention.h"
#include "core/autograd.h"
#include "core/memory.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

// 2 layers of dilated causal attention over 64 tokens, d_model 16, 2 heads
// (head_dim 8), vocab 11, float64.
TransformerConfig SmallConfig() {
  TransformerConfig config;
  config.vocab_size = 11;
  config.context = 64;
  config.d_model = 16;
  config.num_layers = 2;
  config.num_heads = 2;
  config.attention.type = AttentionType::kDilated;
  config.attention.dilated.segment_lengths = {16, 32};
  config.attention.dilated.dilation_rates = {1, 2};
  config.attention.block_sparse.block_size = 8;
  config.attention.block_sparse.window = 16;
  config.attention.causal = true;
  config.dtype = DType::kFloat64;
  return config;
}

// int64 [batch, n] of ids in [0, vocab).
Tensor RandomTokens(int64_t batch, int64_t n, int64_t vocab, Generator& gen) {
  std::vector<double> ids;
  for (double u : Rand({batch, n}, gen, DType::kFloat64).ToVector()) {
    ids.push_back(std::floor(u * vocab));
  }
  return FromVector(ids, {batch, n}, DType::kInt64);
}

// Next-token targets of `tokens` (the last position and every 7th ignored,
// -100), and their count.
Tensor NextTokenTargets(const Tensor& tokens, int64_t* count) {
  const int64_t b = tokens.size(0), n = tokens.size(1);
  std::vector<double> ids = tokens.ToVector(), targets(ids.size(), -100);
  *count = 0;
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t t = 0; t + 1 < n; ++t) {
      if ((i * n + t) % 7 == 3) continue;
      targets[i * n + t] = ids[i * n + t + 1];
      ++*count;
    }
  }
  return FromVector(targets, {b, n}, DType::kInt64);
}

std::shared_ptr<TransformerLM> MakeModel(const TransformerConfig& config,
                                         uint64_t seed) {
  Generator gen(seed);
  absl::StatusOr<std::shared_ptr<TransformerLM>> model =
      TransformerLM::Create(config, gen);
  LC_CHECK(model.ok()) << model.status();
  return *model;
}

// Randomizes the norm scales and biases (which start at 1 and 0), so that
// their gradients are checked at a generic point.
void PerturbNorms(const TransformerLM& model, Generator& gen) {
  NoGradGuard no_grad;
  for (const auto& [name, p] : model.NamedParameters()) {
    if (name.find("norm") == std::string::npos) continue;
    Tensor noise = Randn(p.shape(), gen, DType::kFloat64);
    AddInPlace(p, MulScalar(noise, 0.1).to(p.dtype()));
  }
}

// The model of `config` (weights from `seed`, norms perturbed) against the
// torch model given the same weights, the pattern's pair counts (in the
// config's window) and its soft cap: loss, logits and every parameter
// gradient on a batch of 2 random sequences.
void ExpectMatchesTorch(const TransformerConfig& config, uint64_t seed) {
  Generator gen = testing::TestGenerator(seed);
  auto model = MakeModel(config, gen.seed());
  PerturbNorms(*model, gen);
  const int64_t b = 2, n = config.context;
  const Tensor tokens = RandomTokens(b, n, config.vocab_size, gen);
  int64_t count = 0;
  const Tensor targets = NextTokenTargets(tokens, &count);

  Tensor loss = model->Loss(tokens, targets, count);
  loss.backward();
  Tensor logits;
  {
    NoGradGuard no_grad;
    logits = model->Forward(tokens);
  }

  const AttentionConfig& a = config.attention;
  absl::StatusOr<AttentionPattern> pattern =
      BuildAttentionPattern(a, config.num_heads, n);
  ASSERT_TRUE(pattern.ok()) << pattern.status();
  Tensors inputs = {tokens, targets,
                    PairCounts(*pattern, true, Tensor(), b, n,
                               PairWindow{a.window_left, a.window_right})};
  const auto params = model->NamedParameters();
  for (const auto& [name, p] : params) inputs.push_back(p.detach());
  testing::OracleAttrs attrs;
  attrs.numbers = {{"layers", config.num_layers},
                   {"heads", config.num_heads},
                   {"rms", config.norm == TransformerConfig::Norm::kRMSNorm},
                   {"tied", config.tied_embeddings},
                   {"rope_base", config.rope_base},
                   {"global_count", static_cast<double>(count)}};
  if (a.softcap > 0) attrs.numbers["softcap"] = a.softcap;
  const testing::OracleResult want = testing::RunTorchOp(
      "transformer_lm", inputs, attrs, {Ones({}, DType::kFloat64), Tensor()});

  const testing::Tolerance tol = testing::DefaultTolerance(DType::kFloat64);
  testing::ExpectAllClose(loss, want.outputs[0], tol, "loss");
  testing::ExpectAllClose(logits, want.outputs[1], tol, "logits");
  for (size_t i = 0; i < params.size(); ++i) {
    testing::ExpectAllClose(params[i].second.grad(), want.input_grads[3 + i],
                            tol, params[i].first);
  }
}

TEST(TransformerLMTest, LossLogitsAndEveryGradientMatchTorch) {
  struct Case {
    bool tied;
    TransformerConfig::Norm norm;
  };
  for (const Case& c : {Case{true, TransformerConfig::Norm::kLayerNorm},
                        Case{false, TransformerConfig::Norm::kRMSNorm},
                        Case{true, TransformerConfig::Norm::kRMSNorm},
                        Case{false, TransformerConfig::Norm::kLayerNorm}}) {
    const bool rms = c.norm == TransformerConfig::Norm::kRMSNorm;
    SCOPED_TRACE(absl::StrCat(c.tied ? "tied" : "untied", ", ",
                              rms ? "RMSNorm" : "LayerNorm"));
    TransformerConfig config = SmallConfig();
    config.tied_embeddings = c.tied;
    config.norm = c.norm;
    ExpectMatchesTorch(config, c.tied * 2 + rms);
  }
}

// The config's sliding window and soft cap reach every layer's attention:
// each alone and together, the model equals torch attending only within the
// window with capped scores (a layer that dropped either would not).
TEST(TransformerLMTest, WindowAndSoftcapReachEveryLayer) {
  struct Case {
    int64_t window_left;
    double softcap;
  };
  for (const Case& c : {Case{5, 0}, Case{-1, 0.5}, Case{9, 0.5}}) {
    SCOPED_TRACE(
        absl::StrCat("window_left ", c.window_left, ", softcap ", c.softcap));
    TransformerConfig config = SmallConfig();
    config.attention.window_left = c.window_left;
    config.attention.window_right = 0;
    config.attention.softcap = c.softcap;
    ExpectMatchesTorch(config, 4);
  }
}

struct RanksResult {
  double loss = 0;
  std::map<std::string, Tensor> grads;
};

// Loss summed over k thread ranks (each with its tokens and targets) and the
// parameter gradients after AllReduceGradients, which must agree on every
// rank.
RanksResult RunOnRanks(TransformerConfig config, int k, const Tensor& tokens,
                       const Tensor& targets, int64_t count) {
  config.attention.ranks = k;
  const SequenceLayout layout = config.attention.layout;
  std::vector<double> losses(k);
  std::vector<std::map<std::string, Tensor>> grads(k);
  const absl::Status status = RunRanks(k, [&](Communicator& comm) {
    auto model = MakeModel(config, 5);  // the same weights on every rank
    SequenceParallelContext sp{&comm, config.context};
    const int r = comm.rank();
    Tensor loss = model->Loss(SplitSequence(tokens, k, r, layout),
                              SplitSequence(targets, k, r, layout), count, &sp);
    loss.backward();
    LC_RETURN_IF_ERROR(AllReduceGradients(comm, model->Parameters()));
    losses[r] = loss.item();
    for (const auto& [name, p] : model->NamedParameters()) {
      grads[r][name] = p.grad();
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
  RanksResult result;
  for (int r = 0; r < k; ++r) result.loss += losses[r];
  for (int r = 1; r < k; ++r) {
    for (const auto& [name, g] : grads[0]) {
      EXPECT_EQ(grads[r][name].ToVector(), g.ToVector())
          << name << " differs on rank " << r;
    }
  }
  result.grads = grads[0];
  return result;
}

TEST(TransformerLMTest, RanksGiveTheOneRankLossAndGradients) {
  for (AttentionType type :
       {AttentionType::kRingDilated, AttentionType::kRingBlockSparse}) {
    for (SequenceLayout layout :
         {SequenceLayout::kContiguous, SequenceLayout::kZigzag}) {
      for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
        SCOPED_TRACE(absl::StrCat(AttentionTypeName(type), ", ",
                                  SequenceLayoutName(layout), ", ",
                                  DTypeName(dtype)));
        TransformerConfig config = SmallConfig();
        config.attention.type = type;
        config.attention.layout = layout;
        config.dtype = dtype;
        if (type == AttentionType::kRingBlockSparse) {
          config.attention.dilated = {};  // pure block-sparse local window
        }
        Generator gen = testing::TestGenerator();
        const Tensor tokens =
            RandomTokens(2, config.context, config.vocab_size, gen);
        int64_t count = 0;
        const Tensor targets = NextTokenTargets(tokens, &count);

        // k = 1 without a sequence-parallel context: the reference.
        auto single = MakeModel(config, 5);
        Tensor loss = single->Loss(tokens, targets, count);
        loss.backward();

        const testing::Tolerance tol = testing::DefaultTolerance(dtype);
        for (int k : {1, 2, 4}) {
          SCOPED_TRACE(absl::StrCat("k = ", k));
          const RanksResult got = RunOnRanks(config, k, tokens, targets, count);
          testing::ExpectAllClose(FromVector({got.loss}, {}, dtype), loss, tol,
                                  "loss");
          for (const auto& [name, p] : single->NamedParameters()) {
            testing::ExpectAllClose(got.grads.at(name), p.grad(), tol, name);
          }
        }
      }
    }
  }
}

// Recomputation on ranks: the recomputed blocks rerun ring attention (and
// its communication) inside the backward pass.
TEST(TransformerLMTest, RecomputeOnRanksGivesTheOneRankGradients) {
  TransformerConfig config = SmallConfig();
  config.attention.type = AttentionType::kRingDilated;
  config.attention.layout = SequenceLayout::kZigzag;
  Generator gen = testing::TestGenerator();
  const Tensor tokens = RandomTokens(2, config.context, config.vocab_size, gen);
  int64_t count = 0;
  const Tensor targets = NextTokenTargets(tokens, &count);
  auto single = MakeModel(config, 5);
  Tensor loss = single->Loss(tokens, targets, count);
  loss.backward();
  config.recompute = true;
  const testing::Tolerance tol = testing::DefaultTolerance(DType::kFloat64);
  for (int k : {2, 4}) {
    SCOPED_TRACE(absl::StrCat("k = ", k));
    const RanksResult got = RunOnRanks(config, k, tokens, targets, count);
    testing::ExpectAllClose(FromVector({got.loss}, {}, DType::kFloat64), loss,
                            tol, "loss");
    for (const auto& [name, p] : single->NamedParameters()) {
      testing::ExpectAllClose(got.grads.at(name), p.grad(), tol, name);
    }
  }
}

struct RunResult {
  double loss = 0;
  std::vector<Tensor> grads;
  int64_t peak_bytes = 0;
};

// One forward and backward with the default generator seeded for dropout,
// measuring this thread's peak bytes from before the forward.
RunResult LossAndGradients(const TransformerConfig& config,
                           const Tensor& tokens, const Tensor& targets,
                           int64_t count) {
  auto model = MakeModel(config, 9);
  DefaultGenerator() = Generator(123);
  auto tracker = std::make_shared<MemoryTracker>();
  RunResult result;
  {
    MemoryScope scope(tracker);
    Tensor loss = model->Loss(tokens, targets, count);
    loss.backward();
    result.loss = loss.item();
  }
  result.peak_bytes = tracker->stats().peak_bytes;
  for (const Tensor& p : model->Parameters()) result.grads.push_back(p.grad());
  return result;
}

TEST(TransformerLMTest, RecomputeGivesTheSameResultsInLessMemory) {
  TransformerConfig config;
  config.vocab_size = 32;
  config.context = 1024;
  config.d_model = 32;
  config.num_layers = 6;
  config.num_heads = 2;
  config.dropout = 0.1;  // the masks must repeat in the recomputation
  config.attention.dropout = 0.1;
  config.attention.causal = true;
  config.attention.dilated.segment_lengths = {128, 256};
  config.attention.dilated.dilation_rates = {1, 2};
  config.dtype = DType::kFloat32;
  Generator gen = testing::TestGenerator();
  const Tensor tokens = RandomTokens(1, config.context, config.vocab_size, gen);
  int64_t count = 0;
  const Tensor targets = NextTokenTargets(tokens, &count);

  const RunResult stored = LossAndGradients(config, tokens, targets, count);
  config.recompute = true;
  const RunResult recomputed = LossAndGradients(config, tokens, targets, count);

  EXPECT_EQ(recomputed.loss, stored.loss);
  ASSERT_EQ(recomputed.grads.size(), stored.grads.size());
  for (size_t i = 0; i < stored.grads.size(); ++i) {
    testing::ExpectAllClose(recomputed.grads[i], stored.grads[i],
                            testing::DefaultTolerance(DType::kFloat32),
                            absl::StrCat("parameter ", i));
  }
  const double ratio = static_cast<double>(recomputed.peak_bytes) /
                       static_cast<double>(stored.peak_bytes);
  std::cout << "peak bytes, 6 layers, 1024 tokens, d_model 32: stored "
            << stored.peak_bytes << ", recomputed " << recomputed.peak_bytes
            << " (" << ratio << "x)\n";
  EXPECT_LT(ratio, 0.5);
}

TEST(TransformerLMTest, PrefixLogitsEqualTheFullSequencesPrefix) {
  const TransformerConfig config = SmallConfig();
  auto model = MakeModel(config, 3);
  Generator gen = testing::TestGenerator();
  const Tensor tokens = RandomTokens(2, config.context, config.vocab_size, gen);
  NoGradGuard no_grad;
  const Tensor full = model->Forward(tokens);
  EXPECT_EQ(full.shape(), (Shape{2, 64, 11}));
  const Tensor prefix = model->Forward(tokens.slice(1, 0, 40));
  testing::ExpectAllClose(prefix, full.slice(1, 0, 40),
                          testing::DefaultTolerance(DType::kFloat64), "prefix");
}

TEST(TransformerLMTest, ParameterNamesFollowTheTorchConvention) {
  TransformerConfig config = SmallConfig();
  config.num_layers = 1;
  std::vector<std::string> names;
  for (const auto& [name, p] : MakeModel(config, 1)->NamedParameters()) {
    names.push_back(name);
  }
  const std::vector<std::string> tied = {"embed.weight",
                                         "blocks.0.norm1.weight",
                                         "blocks.0.norm1.bias",
                                         "blocks.0.attn.q_proj.weight",
                                         "blocks.0.attn.q_proj.bias",
                                         "blocks.0.attn.k_proj.weight",
                                         "blocks.0.attn.k_proj.bias",
                                         "blocks.0.attn.v_proj.weight",
                                         "blocks.0.attn.v_proj.bias",
                                         "blocks.0.attn.out_proj.weight",
                                         "blocks.0.attn.out_proj.bias",
                                         "blocks.0.norm2.weight",
                                         "blocks.0.norm2.bias",
                                         "blocks.0.mlp.fc1.weight",
                                         "blocks.0.mlp.fc1.bias",
                                         "blocks.0.mlp.fc2.weight",
                                         "blocks.0.mlp.fc2.bias",
                                         "final_norm.weight",
                                         "final_norm.bias"};
  EXPECT_EQ(names, tied);

  config.tied_embeddings = false;
  config.norm = TransformerConfig::Norm::kRMSNorm;
  config.mlp_hidden = 24;
  const auto untied = MakeModel(config, 1)->NamedParameters();
  EXPECT_EQ(untied.back().first, "lm_head.weight");
  EXPECT_EQ(untied.back().second.shape(), (Shape{11, 16}));
  EXPECT_EQ(untied.size(), tied.size() + 1 - 3);  // no norm biases
  const auto state = MakeModel(config, 1)->StateDict();
  EXPECT_EQ(state.at("blocks.0.mlp.fc1.weight").shape(), (Shape{24, 16}));
}

TEST(TransformerLMTest, BadConfigsNameTheField) {
  struct Case {
    std::function<void(TransformerConfig&)> change;
    std::vector<std::string> pieces;
  };
  const std::vector<Case> cases = {
      {[](TransformerConfig& c) { c.vocab_size = 0; }, {"vocab_size 0"}},
      {[](TransformerConfig& c) { c.context = 0; }, {"context 0"}},
      {[](TransformerConfig& c) { c.d_model = 0; }, {"d_model 0"}},
      {[](TransformerConfig& c) { c.num_layers = 0; }, {"num_layers 0"}},
      {[](TransformerConfig& c) { c.num_heads = 3; },
       {"num_heads 3", "d_model 16", "dividing"}},
      {[](TransformerConfig& c) {
         c.d_model = 12;
         c.num_heads = 4;
       },
       {"head_dim 3", "even"}},
      {[](TransformerConfig& c) { c.mlp_hidden = -1; }, {"mlp_hidden -1"}},
      {[](TransformerConfig& c) { c.dropout = 1; }, {"dropout 1"}},
      {[](TransformerConfig& c) { c.rope_base = 0; }, {"rope_base 0"}},
      {[](TransformerConfig& c) { c.dtype = DType::kInt64; }, {"dtype int64"}},
      {[](TransformerConfig& c) { c.attention.causal = false; },
       {"attention.causal", "causal"}},
      {[](TransformerConfig& c) {
         c.attention.type = AttentionType::kRingDilated;
         c.attention.ranks = 65;
       },
       {"attention.ranks 65", "context 64"}},
      {[](TransformerConfig& c) { c.attention.ranks = 2; },
       {"ranks 2", "ring_dilated"}},
      {[](TransformerConfig& c) { c.attention.dilated.dilation_rates = {1}; },
       {"attention: ", "different lengths"}},
      {[](TransformerConfig& c) { c.attention.dropout = 2; },
       {"attention dropout 2"}},
  };
  for (const Case& c : cases) {
    TransformerConfig config = SmallConfig();
    c.change(config);
    const absl::Status status = ValidateTransformerConfig(config);
    SCOPED_TRACE(status.ToString());
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    for (const std::string& piece : c.pieces) {
      EXPECT_NE(status.message().find(piece), std::string::npos) << piece;
    }
    Generator gen(0);
    EXPECT_EQ(TransformerLM::Create(config, gen).status(), status);
  }
  EXPECT_TRUE(ValidateTransformerConfig(SmallConfig()).ok());
}

// Sizes whose parameters cannot exist are refused before any is made (the
// weights of d_model 10^7 would take 9.6e15 bytes, beyond any address space;
// the first layer of d_model 2^32 overflows int64), quickly and naming the
// sizes, where building them threw std::bad_alloc after initializing the
// embedding.
TEST(TransformerLMTest, ModelsTooLargeForMemoryAreErrorsNamingTheSizes) {
  struct Case {
    int64_t d_model;
    absl::StatusCode code;
    std::string pieces;
  };
  for (const Case& c :
       {Case{10'000'000, absl::StatusCode::kResourceExhausted,
             "needs at least 2400002560000000 parameters, 19200020480000000 "
             "bytes of float64"},
        Case{int64_t{1} << 32, absl::StatusCode::kInvalidArgument,
             "needs 2^63 bytes or more"}}) {
    TransformerConfig config = SmallConfig();
    config.d_model = c.d_model;
    config.vocab_size = 256;
    Generator gen(0);
    const auto start = std::chrono::steady_clock::now();
    const absl::Status status = TransformerLM::Create(config, gen).status();
    EXPECT_LT(std::chrono::steady_clock::now() - start,
              std::chrono::seconds(1));
    SCOPED_TRACE(status.ToString());
    EXPECT_EQ(status.code(), c.code);
    for (const std::string& piece :
         {absl::StrCat("d_model ", c.d_model), std::string("num_layers 2"),
          std::string("mlp_hidden 4 * d_model"), std::string("vocab_size 256"),
          c.pieces}) {
      EXPECT_NE(status.message().find(piece), std::string::npos) << piece;
    }
  }
}

TEST(TransformerLMTest, BadTokensAndTargetsAreClearErrors) {
  const TransformerConfig config = SmallConfig();
  auto model = MakeModel(config, 1);
  Tensor tokens = Zeros({2, 8}, DType::kInt64);
  tokens.set({1, 5}, 11);
  testing::ExpectError([&] { model->Forward(tokens); },
                       {"token id 11 at [1, 5]", "vocab_size = 11"});
  tokens.set({1, 5}, -1);
  testing::ExpectError([&] { model->Forward(tokens); }, {"token id -1"});
  testing::ExpectError(
      [&] {
        model->Forward(Zeros({2, 8}));
      },
      {"tokens", "float32", "int64"});
  testing::ExpectError([&] { model->Forward(Zeros({8}, DType::kInt64)); },
                       {"[8]", "[batch, n_local]"});
  testing::ExpectError(
      [&] {
        model->Forward(Zeros({1, 65}, DType::kInt64));
      },
      {"65 tokens", "context = 64"});

  const Tensor ok_tokens = Zeros({2, 8}, DType::kInt64);
  Tensor targets = Zeros({2, 8}, DType::kInt64);
  targets.set({0, 2}, 12);
  testing::ExpectError([&] { model->Loss(ok_tokens, targets, 16); },
                       {"target 12", "vocab_size = 11", "-100"});
  testing::ExpectError(
      [&] {
        model->Loss(ok_tokens, Zeros({2, 7}, DType::kInt64), 14);
      },
      {"targets of shape [2, 7]", "[2, 8]"});
  testing::ExpectError(
      [&] {
        model->Loss(ok_tokens, Zeros({2, 8}, DType::kInt64), -1);
      },
      {"global_count -1", "over all ranks"});

  // A rank holding the wrong number of tokens, and ranks without a context.
  TransformerConfig ring = config;
  ring.attention.type = AttentionType::kRingDilated;
  ring.attention.ranks = 2;
  auto ring_model = MakeModel(ring, 1);
  testing::ExpectError(
      [&] {
        ring_model->Forward(Zeros({1, 64}, DType::kInt64));
      },
      {"attention.ranks 2", "sequence-parallel context"});
  const absl::Status status = RunRanks(2, [&](Communicator& comm) {
    SequenceParallelContext sp{&comm, 64};
    return StatusFromCall([&] {
      ring_model->Forward(Zeros({1, 31}, DType::kInt64), &sp);
    });
  });
  EXPECT_NE(status.message().find("got 31 tokens (expected 32"),
            std::string::npos)
      << status;
}

}  // namespace
}  // namespace lc
