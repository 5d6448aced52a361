// Benchmark of the fused CPU attention path: forward and forward+backward
// time and GFLOP/s of dilated attention for a list of sequence lengths, next
// to the GFLOP/s of Eigen float32 GEMMs measured in the same run (a large
// square product, the machine's practical peak with Eigen, and the tile-sized
// products the kernel itself runs).
//
// FLOPs count only the useful (query, key) pairs that the pattern allows,
// with the FlashAttention convention: forward = 4 * head_dim * pairs
// (S = Q K^T and O = P V), backward = 10 * head_dim * pairs (the five
// products S = Q K^T recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K,
// dK = dS^T Q), so forward+backward = 14 * head_dim * pairs.
//
//   bazel run -c opt //attention:attention_benchmark -- --lengths=4096,8192

#include <omp.h>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention/attention.h"
#include "attention/attention_config.h"
#include "core/autograd.h"
#include "core/cli.h"
#include "core/random.h"
#include "core/tensor.h"

ABSL_FLAG(std::vector<std::string>, lengths,
          std::vector<std::string>({"4096", "8192", "16384", "32768", "65536"}),
          "Sequence lengths n to time.");
ABSL_FLAG(int64_t, batch, 1, "Batch size.");
ABSL_FLAG(int64_t, heads, 4, "Attention heads.");
ABSL_FLAG(int64_t, head_dim, 64, "Head dimension.");
ABSL_FLAG(std::vector<std::string>, segment_lengths,
          std::vector<std::string>({"2048", "4096", "8192"}),
          "Dilated attention segment lengths w_i.");
ABSL_FLAG(std::vector<std::string>, dilation_rates,
          std::vector<std::string>({"1", "2", "4"}),
          "Dilated attention dilation rates r_i.");
ABSL_FLAG(std::string, head_layout, "head_groups", "head_groups or all_heads.");
ABSL_FLAG(bool, causal, false, "Causal attention (u <= t).");
ABSL_FLAG(int64_t, repeats, 3,
          "Timed runs per measurement (the median is "
          "reported), after one warm-up run.");
ABSL_FLAG(std::string, dtype, "float32", "float32 (the only dtype timed).");
ABSL_FLAG(int64_t, query_tile, lc::AttentionOptions().query_tile,
          "Query rows per tile.");
ABSL_FLAG(int64_t, key_tile, lc::AttentionOptions().key_tile,
          "Key rows per tile.");
ABSL_FLAG(int64_t, gemm_size, 2048, "Side of the square GEMM baseline.");

namespace lc {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kName[] = "attention_benchmark";

[[noreturn]] void Fail(const std::string& message) {
  ExitWithError(kName, message);
}

// CPU time of the whole process (all threads), in milliseconds.
double ProcessCpuMs() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

struct Timing {
  double ms = 0;  // median wall time
  // CPU time over wall time times the OpenMP threads, over the timed calls:
  // near 1 when this process had every core (idle OpenMP threads spin), less
  // when other work on the machine took cores away and the times are inflated.
  double cpu_share = 0;
};

void NoSetup() {}

// Times `repeats` calls of fn after one warm-up call. `setup` runs before each
// call, outside the timed region.
template <typename Setup, typename Fn>
Timing Measure(int64_t repeats, Setup&& setup, Fn&& fn) {
  setup();
  fn();
  std::vector<double> ms;
  double wall_total = 0, cpu_total = 0;
  for (int64_t i = 0; i < repeats; ++i) {
    setup();
    const double cpu_start = ProcessCpuMs();
    const auto start = Clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start)
                     .count());
    cpu_total += ProcessCpuMs() - cpu_start;
    wall_total += ms.back();
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], cpu_total / (wall_total * omp_get_max_threads())};
}

// Allowed (t, u) pairs of all heads of one batch element: for each pattern
// and segment, c selected positions give c * c pairs (c (c + 1) / 2 when
// causal, since queries and keys are the same selected positions).
int64_t UsefulPairs(const AttentionPattern& pattern, int64_t n, bool causal) {
  int64_t pairs = 0;
  for (const auto& patterns : pattern.head_patterns) {
    for (const DilatedPattern& p : patterns) {
      for (int64_t begin = 0; begin < n; begin += p.segment_length) {
        const int64_t length = std::min(p.segment_length, n - begin);
        const int64_t c =
            length > p.offset
                ? (length - p.offset + p.dilation_rate - 1) / p.dilation_rate
                : 0;
        pairs += causal ? c * (c + 1) / 2 : c * c;
      }
    }
  }
  return pairs;
}

double Gflops(double flops, double ms) { return flops / (ms * 1e6); }

struct Rate {
  double gflops = 0;
  double cpu_share = 0;
};

// GFLOP/s of C = A B for square float32 matrices of side `size`, Eigen's own
// OpenMP parallel GEMM.
Rate SquareGemm(int64_t size, int64_t repeats) {
  const Eigen::MatrixXf a = Eigen::MatrixXf::Random(size, size);
  const Eigen::MatrixXf b = Eigen::MatrixXf::Random(size, size);
  Eigen::MatrixXf c(size, size);
  const Timing t = Measure(repeats, NoSetup, [&] { c.noalias() = a * b; });
  if (!std::isfinite(c.sum())) Fail("square GEMM produced a non-finite value");
  return {Gflops(2.0 * size * size * size, t.ms), t.cpu_share};
}

// GFLOP/s of the products of one forward tile, S = Q K^T ([tq, d] x [d, tk])
// then O = S V ([tq, tk] x [tk, d]), row-major as the kernel runs them, one
// single-threaded Eigen product per OpenMP thread over many independent
// buffers (so the working set is not one tile sitting in L1).
double TileGemmGflops(int64_t tq, int64_t tk, int64_t d, int64_t repeats) {
  using RowMatrix =
      Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr int64_t kBuffers = 64, kRounds = 8;
  std::vector<RowMatrix> q(kBuffers), k(kBuffers), v(kBuffers);
  for (int64_t i = 0; i < kBuffers; ++i) {
    q[i] = RowMatrix::Random(tq, d);
    k[i] = RowMatrix::Random(tk, d);
    v[i] = RowMatrix::Random(tk, d);
  }
  const int threads = omp_get_max_threads();
  std::vector<RowMatrix> s(threads), o(threads);
  auto run = [&] {
#pragma omp parallel
    {
      const int id = omp_get_thread_num();
      s[id].resize(tq, tk);
      o[id].resize(tq, d);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < kBuffers * kRounds; ++i) {
        const int64_t j = i % kBuffers;
        s[id].noalias() = q[j] * k[j].transpose();
        o[id].noalias() = s[id] * v[j];
      }
    }
  };
  const double ms = Measure(repeats, NoSetup, run).ms;
  for (const RowMatrix& m : o) {
    if (m.size() > 0 && !std::isfinite(m.sum())) {
      Fail("tile GEMM produced a non-finite value");
    }
  }
  return Gflops(4.0 * tq * tk * d * kBuffers * kRounds, ms);
}

bool AllFinite(const Tensor& t) {
  const float* data = t.contiguous().data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (!std::isfinite(data[i])) return false;
  }
  return true;
}

int Run() {
  const std::vector<int64_t> lengths =
      PositiveIntegersOrExit(kName, "lengths", absl::GetFlag(FLAGS_lengths));
  const int64_t batch = absl::GetFlag(FLAGS_batch);
  const int64_t heads = absl::GetFlag(FLAGS_heads);
  const int64_t head_dim = absl::GetFlag(FLAGS_head_dim);
  const bool causal = absl::GetFlag(FLAGS_causal);
  const int64_t repeats = absl::GetFlag(FLAGS_repeats);
  if (batch < 1 || heads < 1 || head_dim < 1 || repeats < 1) {
    Fail("--batch, --heads, --head_dim and --repeats must be >= 1");
  }
  if (absl::GetFlag(FLAGS_dtype) != "float32") {
    Fail(absl::StrCat("--dtype=", absl::GetFlag(FLAGS_dtype),
                      " (expected float32)"));
  }
  AttentionConfig config;
  config.type = AttentionType::kDilated;
  config.causal = causal;
  config.dilated.segment_lengths = PositiveIntegersOrExit(
      kName, "segment_lengths", absl::GetFlag(FLAGS_segment_lengths));
  config.dilated.dilation_rates = PositiveIntegersOrExit(
      kName, "dilation_rates", absl::GetFlag(FLAGS_dilation_rates));
  absl::StatusOr<HeadLayout> layout =
      ParseHeadLayout(absl::GetFlag(FLAGS_head_layout));
  if (!layout.ok()) Fail(std::string(layout.status().message()));
  config.dilated.head_layout = *layout;
  AttentionOptions options = MakeAttentionOptions(config, /*training=*/false);
  options.query_tile = absl::GetFlag(FLAGS_query_tile);
  options.key_tile = absl::GetFlag(FLAGS_key_tile);

  std::printf(
      "machine: %u hardware threads, %d OpenMP threads, Eigen %d.%d.%d "
      "(%s)\n",
      std::thread::hardware_concurrency(), omp_get_max_threads(),
      EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
      Eigen::SimdInstructionSetsInUse());
  std::printf(
      "dilated attention: batch %ld, heads %ld, head_dim %ld, w = [%s], "
      "r = [%s], %s, %s, tiles %ld x %ld, float32, median of %ld after 1 "
      "warm-up\n",
      batch, heads, head_dim,
      absl::StrJoin(config.dilated.segment_lengths, ",").c_str(),
      absl::StrJoin(config.dilated.dilation_rates, ",").c_str(),
      absl::GetFlag(FLAGS_head_layout).c_str(),
      causal ? "causal" : "non-causal", options.query_tile, options.key_tile,
      repeats);
  std::printf(
      "FLOPs: useful pairs only; forward 4*d*pairs, backward 10*d*pairs "
      "(FlashAttention convention, recomputation of QK^T included), "
      "forward+backward 14*d*pairs\n");

  const int64_t gemm_size = absl::GetFlag(FLAGS_gemm_size);
  const Rate gemm_before = SquareGemm(gemm_size, repeats);
  const double tile_gemm =
      TileGemmGflops(options.query_tile, options.key_tile, head_dim, repeats);
  std::printf(
      "Eigen GEMM %ld^3 (OpenMP), before the attention runs: %7.1f GFLOP/s "
      "(cpu %3.0f%%)\n",
      gemm_size, gemm_before.gflops, 100 * gemm_before.cpu_share);
  std::printf(
      "Eigen tile GEMMs [%ld x %ld] x [%ld x %ld] + [%ld x %ld] x [%ld x %ld], "
      "one per thread: %7.1f GFLOP/s\n",
      options.query_tile, head_dim, head_dim, options.key_tile,
      options.query_tile, options.key_tile, options.key_tile, head_dim,
      tile_gemm);
  std::fflush(stdout);

  struct Row {
    int64_t n;
    double pairs;
    Timing fwd, fwd_bwd;
  };
  std::vector<Row> rows;
  for (const int64_t n : lengths) {
    absl::StatusOr<AttentionPattern> pattern =
        BuildAttentionPattern(config, heads, n);
    if (!pattern.ok()) Fail(std::string(pattern.status().message()));
    const double pairs =
        static_cast<double>(batch) * UsefulPairs(*pattern, n, causal);
    Generator gen(n);
    const Shape shape = {batch, n, heads, head_dim};
    const Tensor q = Randn(shape, gen), k = Randn(shape, gen),
                 v = Randn(shape, gen), grad_out = Randn(shape, gen);

    Tensor out;
    const Timing fwd = Measure(repeats, NoSetup, [&] {
      NoGradGuard no_grad;
      out = Attention(q, k, v, *pattern, options).out;
    });
    if (!AllFinite(out)) Fail("forward produced a non-finite value");

    Tensor ql, kl, vl;
    const Timing fwd_bwd = Measure(
        repeats,
        [&] {
          // Fresh leaves, so gradients never accumulate across runs.
          ql = q.detach().set_requires_grad(true);
          kl = k.detach().set_requires_grad(true);
          vl = v.detach().set_requires_grad(true);
        },
        [&] {
          const Tensor o = Attention(ql, kl, vl, *pattern, options).out;
          Backward({o}, {grad_out});
        });
    if (!AllFinite(ql.grad()) || !AllFinite(kl.grad()) ||
        !AllFinite(vl.grad())) {
      Fail("backward produced a non-finite value");
    }
    rows.push_back(Row{n, pairs, fwd, fwd_bwd});
    std::fprintf(stderr, "n = %ld: forward %.1f ms, forward+backward %.1f ms\n",
                 n, fwd.ms, fwd_bwd.ms);
  }

  const Rate gemm_after = SquareGemm(gemm_size, repeats);
  std::printf(
      "Eigen GEMM %ld^3 (OpenMP), after the attention runs:  %7.1f GFLOP/s "
      "(cpu %3.0f%%)\n",
      gemm_size, gemm_after.gflops, 100 * gemm_after.cpu_share);
  // Other work on the machine only lowers a rate: the higher of the two GEMM
  // measurements is the better estimate of the peak.
  const double gemm = std::max(gemm_before.gflops, gemm_after.gflops);
  std::printf("\n%7s %11s %9s %9s %6s %5s %11s %9s %6s %5s\n", "n", "pairs",
              "fwd ms", "fwd GF/s", "%GEMM", "cpu", "fwd+bwd ms", "f+b GF/s",
              "%GEMM", "cpu");
  for (const Row& row : rows) {
    const double fwd_gflops = Gflops(4.0 * head_dim * row.pairs, row.fwd.ms);
    const double fwd_bwd_gflops =
        Gflops(14.0 * head_dim * row.pairs, row.fwd_bwd.ms);
    std::printf(
        "%7ld %11.0f %9.1f %9.1f %5.0f%% %4.0f%% %11.1f %9.1f %5.0f%% "
        "%4.0f%%\n",
        row.n, row.pairs, row.fwd.ms, fwd_gflops, 100 * fwd_gflops / gemm,
        100 * row.fwd.cpu_share, row.fwd_bwd.ms, fwd_bwd_gflops,
        100 * fwd_bwd_gflops / gemm, 100 * row.fwd_bwd.cpu_share);
  }
  std::printf(
      "%%GEMM: share of %.1f GFLOP/s, the higher of the two %ld^3 GEMM rates. "
      "cpu: process CPU time / (wall time x %d threads); well under 100%% "
      "means "
      "other work took cores and the times are inflated.\n",
      gemm, gemm_size, omp_get_max_threads());
  return 0;
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return lc::Run();
}
