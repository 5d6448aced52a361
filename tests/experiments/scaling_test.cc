// The scaling experiments at tiny sizes (seconds in all): each one's CSV has
// the expected columns, and the facts that must hold do: per-rank memory
// does not grow with k, dense time grows faster than dilated, the bytes the
// ring sends equal the formula, recomputation fits at least as long a
// context. Then the binary as a user runs it: CSV and (with Debian's
// python3-matplotlib) PNG files, and one-line errors for bad flags and a
// missing GPU.
#include "experiments/scaling.h"

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/cuda.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tools/run_program.h"

namespace lc {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// A CSV as its header and rows of name -> value.
struct Csv {
  std::vector<std::string> columns;
  std::vector<std::map<std::string, std::string>> rows;

  double Number(size_t row, const std::string& column) const {
    double value = 0;
    EXPECT_TRUE(absl::SimpleAtod(rows.at(row).at(column), &value))
        << column << " of row " << row << ": \"" << rows[row].at(column)
        << "\"";
    return value;
  }
};

Csv ParseCsv(const std::string& text) {
  Csv csv;
  std::istringstream lines(text);
  std::string line;
  std::getline(lines, line);
  csv.columns = absl::StrSplit(line, ',');
  while (std::getline(lines, line)) {
    const std::vector<std::string> cells = absl::StrSplit(line, ',');
    EXPECT_EQ(cells.size(), csv.columns.size()) << line;
    std::map<std::string, std::string> row;
    for (size_t c = 0; c < cells.size() && c < csv.columns.size(); ++c) {
      row[csv.columns[c]] = cells[c];
    }
    csv.rows.push_back(row);
  }
  return csv;
}

// Sizes at which every experiment takes a second or less.
ScalingOptions TinyOptions() {
  ScalingOptions o = DefaultScalingOptions(Device::Cpu());
  o.threads = 1;
  o.repeats = 5;
  o.heads = 2;
  o.head_dim = 16;
  o.n = 256;
  o.ranks = {1, 2, 4};
  o.min_n = 256;
  o.max_n = 2048;
  o.time_budget_s = 30;
  o.dilated.segment_lengths = {64, 128, 256};
  o.dilated.dilation_rates = {1, 2, 4};
  o.block_sparse.block_size = 32;
  o.block_sparse.window = 64;
  o.dilation_rates = {1, 2, 4};
  o.tile_order_lengths = {256, 512};
  o.model.d_model = 32;
  o.model.num_heads = 2;
  o.model.attention.dilated.segment_lengths = {32, 128};
  o.model.attention.dilated.dilation_rates = {1, 4};
  o.context_budget = 3 << 20;
  o.context_step = 64;
  o.max_context_ranks = {1, 2};
  return o;
}

Csv RunAndParse(const std::string& name, const ScalingOptions& options) {
  const absl::StatusOr<Table> table = RunExperiment(name, options);
  EXPECT_TRUE(table.ok()) << table.status();
  if (!table.ok()) return Csv();
  EXPECT_EQ(table->experiment, name);
  std::cout << FormatTable(*table);
  return ParseCsv(TableCsv(*table));
}

TEST(ScalingTest, MemoryPerRankDoesNotGrowWithRanks) {
  const Csv csv = RunAndParse("memory_vs_ranks", TinyOptions());
  EXPECT_THAT(csv.columns,
              ElementsAreArray(
                  {"ranks", "n", "tokens_per_rank", "dilated_attention_bytes",
                   "dilated_attention_ideal_bytes", "dense_attention_bytes",
                   "dense_attention_ideal_bytes", "training_step_bytes",
                   "training_step_ideal_bytes"}));
  ASSERT_EQ(csv.rows.size(), 3u);
  for (const std::string series :
       {"dilated_attention", "dense_attention", "training_step"}) {
    SCOPED_TRACE(series);
    const double first = csv.Number(0, series + "_bytes");
    EXPECT_GT(first, 0);
    for (size_t i = 0; i < csv.rows.size(); ++i) {
      const double k = csv.Number(i, "ranks");
      EXPECT_EQ(csv.Number(i, series + "_ideal_bytes"),
                static_cast<int64_t>(first) / static_cast<int64_t>(k));
      if (i > 0) {
        EXPECT_LE(csv.Number(i, series + "_bytes"),
                  csv.Number(i - 1, series + "_bytes"))
            << "k = " << k;
      }
    }
  }
  // Dilated ring attention whose keys travel cut down stays near the ideal.
  for (size_t i = 0; i < csv.rows.size(); ++i) {
    EXPECT_LE(csv.Number(i, "dilated_attention_bytes"),
              1.25 * csv.Number(i, "dilated_attention_ideal_bytes") + 16384)
        << "k = " << csv.Number(i, "ranks");
  }
}

TEST(ScalingTest, DenseTimeGrowsFasterThanDilated) {
  const Csv csv = RunAndParse("time_vs_length", TinyOptions());
  EXPECT_THAT(
      csv.columns,
      ElementsAreArray({"attention", "n", "pairs", "forward_ms",
                        "forward_backward_ms", "forward_backward_gflops",
                        "peak_bytes", "cpu_share", "calls"}));
  // n = 256 .. 2048 for each type (the time budget is far away).
  std::map<std::string, std::map<int64_t, size_t>> rows;
  for (size_t i = 0; i < csv.rows.size(); ++i) {
    rows[csv.rows[i].at("attention")][csv.Number(i, "n")] = i;
  }
  ASSERT_EQ(rows.size(), 3u);
  for (const auto& [type, by_n] : rows) {
    EXPECT_EQ(by_n.size(), 4u) << type;
  }
  auto growth = [&](const std::string& type, const std::string& column) {
    return csv.Number(rows[type][2048], column) /
           csv.Number(rows[type][256], column);
  };
  // Pairs: dense n^2 per head, dilated linear in n past the longest
  // segment.
  EXPECT_EQ(csv.Number(rows["dense"][2048], "pairs"), 2.0 * 2048 * 2048);
  EXPECT_EQ(growth("dense", "pairs"), 64);
  EXPECT_EQ(growth("dilated", "pairs"), 8);
  // Time follows: 8x the tokens cost dense far more than 8x (64x the
  // pairs), dilated about 8x.
  EXPECT_GT(growth("dense", "forward_backward_ms"),
            1.5 * growth("dilated", "forward_backward_ms"));
  // No n x n tensor: memory grows linearly for every type.
  for (const auto& [type, by_n] : rows) {
    EXPECT_LT(growth(type, "peak_bytes"), 9) << type;
  }
}

TEST(ScalingTest, RingBytesEqualTheFormula) {
  const ScalingOptions options = TinyOptions();
  const Csv csv = RunAndParse("communication", options);
  EXPECT_THAT(csv.columns,
              ElementsAreArray({"ranks", "dilation_rate", "n", "forward_bytes",
                                "forward_backward_bytes", "formula_bytes",
                                "whole_chunk_bytes", "transfers",
                                "steps_computed", "steps_skipped"}));
  ASSERT_EQ(csv.rows.size(), 2u * 3u);  // k = 2, 4 (1 sends nothing) x r
  for (size_t i = 0; i < csv.rows.size(); ++i) {
    const int64_t k = csv.Number(i, "ranks"),
                  r = csv.Number(i, "dilation_rate");
    SCOPED_TRACE(absl::StrCat("k = ", k, ", r = ", r));
    // 6 (k - 1) heads (n / (k r)) batch head_dim 4, computed here again.
    const double formula = 6.0 * (k - 1) * options.heads *
                           (options.n / (k * r)) * options.batch *
                           options.head_dim * 4;
    EXPECT_EQ(csv.Number(i, "formula_bytes"), formula);
    EXPECT_EQ(csv.Number(i, "forward_backward_bytes"), formula);
    EXPECT_EQ(csv.Number(i, "forward_bytes"), formula / 3);
    EXPECT_EQ(csv.Number(i, "whole_chunk_bytes"), formula * r);
  }
}

TEST(ScalingTest, RecomputationFitsALongerContext) {
  const ScalingOptions options = TinyOptions();
  const Csv csv = RunAndParse("max_context", options);
  EXPECT_THAT(
      csv.columns,
      ElementsAreArray({"ranks", "recompute", "max_context", "tokens_per_rank",
                        "peak_bytes", "budget_bytes", "steps_run"}));
  ASSERT_EQ(csv.rows.size(), 4u);  // k = 1, 2 x without, with
  // (ranks, recompute) -> longest context
  std::map<std::pair<int64_t, bool>, double> longest;
  for (size_t i = 0; i < csv.rows.size(); ++i) {
    const double n = csv.Number(i, "max_context");
    EXPECT_GT(n, 0);
    EXPECT_EQ(static_cast<int64_t>(n) % options.context_step, 0);
    EXPECT_LE(csv.Number(i, "peak_bytes"), options.context_budget);
    EXPECT_GT(csv.Number(i, "peak_bytes"), options.context_budget / 2);
    longest[std::make_pair(static_cast<int64_t>(csv.Number(i, "ranks")),
                           csv.rows[i].at("recompute") == "1")] = n;
  }
  for (int64_t k : {1, 2}) {
    EXPECT_GE(longest[std::make_pair(k, true)],
              longest[std::make_pair(k, false)])
        << "k = " << k;
  }
  for (bool recompute : {false, true}) {
    EXPECT_GT(longest[std::make_pair(int64_t{2}, recompute)],
              longest[std::make_pair(int64_t{1}, recompute)])
        << "recompute " << recompute;
  }
}

TEST(ScalingTest, TileOrderTimesBothOrdersOfEveryPattern) {
  const Csv csv = RunAndParse("tile_order", TinyOptions());
  EXPECT_THAT(csv.columns,
              ElementsAreArray({"pattern", "tile_order", "n", "density",
                                "forward_ms", "forward_backward_ms",
                                "relative_to_row_major", "cpu_share"}));
  std::set<std::tuple<std::string, std::string, std::string>> seen;
  for (size_t i = 0; i < csv.rows.size(); ++i) {
    seen.insert({csv.rows[i].at("pattern"), csv.rows[i].at("tile_order"),
                 csv.rows[i].at("n")});
    EXPECT_GT(csv.Number(i, "forward_backward_ms"), 0);
    EXPECT_GT(csv.Number(i, "density"), 0);
    if (csv.rows[i].at("tile_order") == "row_major") {
      EXPECT_EQ(csv.rows[i].at("relative_to_row_major"), "1.000");
    }
  }
  std::set<std::tuple<std::string, std::string, std::string>> want;
  for (const char* n : {"256", "512"}) {
    for (const char* pattern :
         {"local_window", "dilated_sparse", "global_local", "random"}) {
      for (const char* order : {"row_major", "hilbert"}) {
        want.insert({pattern, order, n});
      }
    }
  }
  EXPECT_EQ(seen, want);
  EXPECT_EQ(csv.rows.size(), want.size());
}

TEST(ScalingTest, BadOptionsNameTheValue) {
  ScalingOptions options = TinyOptions();
  options.dilation_rates = {3};
  absl::StatusOr<Table> table = RunExperiment("communication", options);
  ASSERT_FALSE(table.ok());
  EXPECT_THAT(std::string(table.status().message()),
              HasSubstr("rate r = 3 (expected r >= 1 and n a multiple of"));
  table = RunExperiment("speed", TinyOptions());
  ASSERT_FALSE(table.ok());
  EXPECT_THAT(std::string(table.status().message()),
              HasSubstr("no experiment \"speed\""));
  options = TinyOptions();
  options.repeats = 0;
  table = RunExperiment("tile_order", options);
  ASSERT_FALSE(table.ok());
  EXPECT_THAT(std::string(table.status().message()), HasSubstr("repeats = 0"));
}

// ---- The binary ----

// Relative to the test's working directory (the runfiles root).
constexpr char kScaling[] = "experiments/scaling";
constexpr char kPython[] = "/usr/bin/python3";

using Result = testing::ProgramResult;

Result RunScaling(const std::vector<std::string>& args) {
  return testing::RunProgram(kScaling, args);
}

bool HaveMatplotlib() {
  return access(kPython, X_OK) == 0 &&
         std::system(
             absl::StrCat(kPython, " -c 'import matplotlib' 2>/dev/null")
                 .c_str()) == 0;
}

TEST(ScalingCliTest, WritesTheCsvAndThePlot) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/scaling_cli");
  fs::remove_all(dir);
  const Result result =
      RunScaling({"--experiment=communication", "--n=64", "--ranks=2,4",
                  "--dilation_rates=1,2", "--heads=2", "--head_dim=8",
                  "--out_dir=" + dir});
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_THAT(result.output, HasSubstr("[communication] k=2 r=1: "));
  EXPECT_THAT(result.output, HasSubstr("[communication] k=4 r=2: "));
  EXPECT_THAT(result.output, HasSubstr("wrote " + dir + "/communication.csv"));
  std::ifstream csv_file(dir + "/communication.csv");
  std::stringstream text;
  text << csv_file.rdbuf();
  const Csv csv = ParseCsv(text.str());
  EXPECT_EQ(csv.rows.size(), 4u);
  EXPECT_EQ(csv.columns.at(4), "forward_backward_bytes");
  if (!HaveMatplotlib()) {
    EXPECT_THAT(result.output, HasSubstr("plots: not drawn: "));
    GTEST_SKIP() << kPython << " has no matplotlib (setup.sh installs "
                 << "python3-matplotlib): the PNG is not checked";
  }
  EXPECT_THAT(result.output, HasSubstr("wrote " + dir + "/communication.png"));
  std::ifstream png(dir + "/communication.png", std::ios::binary);
  std::string head(8, '\0');
  png.read(head.data(), 8);
  EXPECT_EQ(head, std::string("\x89PNG\r\n\x1a\n", 8));
}

// Exit status 1 and exactly one line naming the problem.
void ExpectError(const std::vector<std::string>& args,
                 const std::string& piece) {
  const Result result = RunScaling(args);
  EXPECT_EQ(result.exit_code, 1) << result.output;
  EXPECT_EQ(result.output.find('\n'), result.output.size() - 1)
      << "expected one line, got:\n"
      << result.output;
  EXPECT_THAT(result.output, HasSubstr(piece));
}

TEST(ScalingCliTest, BadFlagsAreOneLineErrors) {
  ExpectError({"--experiment=speed"},
              "scaling: --experiment=speed: no experiment \"speed\"");
  ExpectError({"--ranks=1,x"}, "--ranks=1,x: \"x\" is not a positive integer");
  ExpectError({"--device=tpu"}, "--device=tpu (expected cpu, cuda or cuda:N)");
  ExpectError({"extra"}, "unexpected argument \"extra\"");
  if (CudaDeviceCount() == 0) {
    ExpectError({"--device=cuda"},
                "--device=cuda: this machine has 0 CUDA devices");
  }
}

}  // namespace
}  // namespace lc
