// Runs //train as a user would, as a subprocess whose stdout is a pipe: --help
// lists the flags with their defaults; a tiny run prints plain lines (no
// '\r'), appends the JSONL metrics the README documents and writes
// checkpoints; --resume continues it with the losses of an uninterrupted run;
// train/plot_metrics.py turns its metrics into a PNG; bad flags, a stray
// argument and a missing data file each exit 1 with one line naming the
// problem.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tools/run_program.h"

namespace lc {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

// The binary and the plot script, relative to the test's working directory
// (the runfiles root).
constexpr char kTrain[] = "train/train";
constexpr char kPlot[] = "train/plot_metrics.py";
// The interpreter of the plot script's "#!" line.
constexpr char kPython[] = "/usr/bin/python3";

// A model and task that train in well under a second: 2 layers of width 32
// over 128 tokens, passkey retrieval aligned to the long dilated pattern.
const std::vector<std::string> kTiny = {"--context=128",
                                        "--d_model=32",
                                        "--heads=2",
                                        "--segment_lengths=32,128",
                                        "--dilation_rates=1,4",
                                        "--batch=2",
                                        "--queries=8",
                                        "--keys=8",
                                        "--warmup=1",
                                        "--eval_batches=1",
                                        "--eval_every=0",
                                        "--log_every=1",
                                        "--checkpoint_every=2"};

std::string FreshDir(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/", name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

using Result = testing::ProgramResult;
using testing::RunProgram;

Result RunTrain(const std::vector<std::string>& flags) {
  std::vector<std::string> args = kTiny;
  args.insert(args.end(), flags.begin(), flags.end());
  return RunProgram(kTrain, args);
}

// The members of one JSON object (a JSONL line) as name -> the raw text of
// the value; strings, nested arrays and objects are kept whole. Fails the
// test and returns what it has on text that is not one object.
std::map<std::string, std::string> ParseObject(const std::string& line) {
  std::map<std::string, std::string> members;
  const std::string text(absl::StripAsciiWhitespace(line));
  if (text.size() < 2 || text.front() != '{' || text.back() != '}') {
    ADD_FAILURE() << "not a JSON object: " << line;
    return members;
  }
  size_t i = 1;
  auto skip_space = [&] {
    while (i < text.size() && absl::ascii_isspace(text[i])) ++i;
  };
  // The end of the value starting at i: a string, or anything up to the
  // next ',' or '}' outside brackets and strings.
  auto value_end = [&](size_t at) {
    int depth = 0;
    bool in_string = false;
    for (size_t j = at; j < text.size(); ++j) {
      const char c = text[j];
      if (in_string) {
        if (c == '\\') {
          ++j;
        } else if (c == '"') {
          in_string = false;
        }
      } else if (c == '"') {
        in_string = true;
      } else if (c == '[' || c == '{') {
        ++depth;
      } else if (c == ']' || (c == '}' && depth > 0)) {
        --depth;
      } else if (depth == 0 && (c == ',' || c == '}')) {
        return j;
      }
    }
    return text.size();
  };
  while (true) {
    skip_space();
    if (i >= text.size() || text[i] != '"') break;
    const size_t name_end = text.find('"', i + 1);
    if (name_end == std::string::npos) break;
    const std::string name = text.substr(i + 1, name_end - i - 1);
    i = name_end + 1;
    skip_space();
    if (i >= text.size() || text[i] != ':') break;
    ++i;
    skip_space();
    const size_t end = value_end(i);
    if (end >= text.size()) break;
    members[name] = std::string(
        absl::StripTrailingAsciiWhitespace(text.substr(i, end - i)));
    i = end + 1;
    if (text[end] == '}') {
      if (i != text.size()) ADD_FAILURE() << "text after the object: " << line;
      return members;
    }
  }
  ADD_FAILURE() << "malformed JSON object: " << line;
  return members;
}

std::set<std::string> Keys(const std::map<std::string, std::string>& object) {
  std::set<std::string> keys;
  for (const auto& [name, value] : object) keys.insert(name);
  return keys;
}

double Number(const std::map<std::string, std::string>& object,
              const std::string& name) {
  double value = 0;
  EXPECT_TRUE(object.count(name) != 0 &&
              absl::SimpleAtod(object.at(name), &value))
      << name << " is not a number in the record";
  return value;
}

std::vector<std::map<std::string, std::string>> ReadMetrics(
    const std::string& path) {
  std::ifstream file(path);
  EXPECT_TRUE(file.good()) << "no metrics file " << path;
  std::vector<std::map<std::string, std::string>> records;
  for (std::string line; std::getline(file, line);) {
    records.push_back(ParseObject(line));
  }
  return records;
}

// The training loss of each step in `records`, as written (9 digits).
std::map<int64_t, std::string> TrainLosses(
    const std::vector<std::map<std::string, std::string>>& records) {
  std::map<int64_t, std::string> losses;
  for (const auto& record : records) {
    if (record.count("kind") != 0 && record.at("kind") == "\"train\"") {
      losses[static_cast<int64_t>(Number(record, "step"))] = record.at("loss");
    }
  }
  return losses;
}

TEST(TrainCliTest, HelpListsTheFlagsWithDefaults) {
  const Result result = RunProgram(kTrain, {"--help"});
  // absl's --help exits 1 after printing the usage.
  EXPECT_EQ(result.exit_code, 1) << result.output;
  EXPECT_THAT(result.output,
              AllOf(HasSubstr("Trains a long-context byte-level transformer"),
                    HasSubstr("-steps (Optimizer steps of the run.); "
                              "default: 240;"),
                    HasSubstr("-context (Tokens (bytes) per sequence.); "
                              "default: 4096;"),
                    HasSubstr("-ranks"), HasSubstr("-attention"),
                    HasSubstr("default: \"ring_dilated\""), HasSubstr("-task"),
                    HasSubstr("default: \"passkey\""), HasSubstr("-resume"),
                    HasSubstr("-checkpoint_dir"), HasSubstr("-metrics"),
                    HasSubstr("-seed"), HasSubstr("-dropout")));
}

// The tiny run with dropout, stopped after step 2 and resumed, and the same
// run uninterrupted; made once, on first use, for the tests below.
struct TinyRuns {
  std::string dir;      // holds ckpt/, the metrics files and the plot
  std::string metrics;  // of the stopped and the resumed run
  std::string reference_metrics;
  Result stopped, resumed, reference;
};

const TinyRuns& Runs() {
  static const TinyRuns* const runs = [] {
    auto* r = new TinyRuns;
    r->dir = FreshDir("train_cli_run");
    r->metrics = r->dir + "/run.jsonl";
    r->reference_metrics = r->dir + "/reference.jsonl";
    const std::string ckpt = "--checkpoint_dir=" + r->dir + "/ckpt";
    r->stopped = RunTrain({"--steps=4", "--stop_after=2", ckpt,
                           "--metrics=" + r->metrics, "--dropout=0.1"});
    r->resumed = RunTrain({"--steps=4", ckpt, "--metrics=" + r->metrics,
                           "--dropout=0.1", "--resume"});
    r->reference = RunTrain(
        {"--steps=4", "--metrics=" + r->reference_metrics, "--dropout=0.1"});
    return r;
  }();
  return *runs;
}

TEST(TrainCliTest, PrintsPlainLinesWhenNotOnATerminal) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  const std::string& out = runs.stopped.output;
  EXPECT_EQ(out.find('\r'), std::string::npos) << out;
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.back(), '\n');
  EXPECT_THAT(
      out,
      AllOf(HasSubstr("model: "), HasSubstr("data: "),
            HasSubstr("\nstep 1/4 | loss "), HasSubstr("\nstep 2/4 | loss "),
            HasSubstr(" tok/s"), HasSubstr("ETA"), HasSubstr("peak"),
            HasSubstr("\neval step 2: accuracy"), HasSubstr("(chance 12.5%)"),
            HasSubstr("step_2.safetensors"), HasSubstr("done in")));
  EXPECT_THAT(out, ::testing::Not(HasSubstr("step 3/4")));
}

TEST(TrainCliTest, WritesTheDocumentedMetrics) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  const auto records = ReadMetrics(runs.metrics);
  // Appended by both runs: train 1, train 2, eval 2, train 3, train 4, eval 4.
  ASSERT_EQ(records.size(), 6u);
  const std::set<std::string> train_keys = {
      "kind",      "step",         "loss",      "lr",
      "grad_norm", "tokens_per_s", "elapsed_s", "peak_bytes"};
  const std::set<std::string> eval_keys = {"kind",
                                           "step",
                                           "loss",
                                           "accuracy",
                                           "chance",
                                           "answers",
                                           "accuracy_by_distance"};
  const std::vector<std::pair<std::string, int>> expected = {
      {"train", 1}, {"train", 2}, {"eval", 2},
      {"train", 3}, {"train", 4}, {"eval", 4}};
  for (size_t i = 0; i < records.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("record ", i));
    const auto& r = records[i];
    EXPECT_EQ(r.at("kind"), absl::StrCat("\"", expected[i].first, "\""));
    EXPECT_EQ(Number(r, "step"), expected[i].second);
    EXPECT_GT(Number(r, "loss"), 0);
    if (expected[i].first == "train") {
      EXPECT_EQ(Keys(r), train_keys);
      EXPECT_GT(Number(r, "lr"), 0);
      EXPECT_GT(Number(r, "grad_norm"), 0);
      EXPECT_GT(Number(r, "tokens_per_s"), 0);
      EXPECT_GE(Number(r, "elapsed_s"), 0);
      EXPECT_GT(Number(r, "peak_bytes"), 0);
    } else {
      EXPECT_EQ(Keys(r), eval_keys);
      EXPECT_EQ(Number(r, "chance"), 0.125);
      EXPECT_EQ(Number(r, "answers"), 16);  // 1 batch of 2 x 8 queries
      const double accuracy = Number(r, "accuracy");
      EXPECT_TRUE(accuracy >= 0 && accuracy <= 1) << accuracy;
      const std::string& buckets = r.at("accuracy_by_distance");
      ASSERT_TRUE(absl::StartsWith(buckets, "[{") &&
                  absl::EndsWith(buckets, "}]"))
          << buckets;
      // Each bucket is an object of min, max, answers and accuracy.
      for (absl::string_view bucket :
           absl::StrSplit(buckets.substr(1, buckets.size() - 2), "}, {")) {
        std::string object(bucket);
        if (!absl::StartsWith(object, "{")) object = "{" + object;
        if (!absl::EndsWith(object, "}")) object += "}";
        EXPECT_EQ(Keys(ParseObject(object)),
                  (std::set<std::string>{"min", "max", "answers", "accuracy"}))
            << object;
      }
    }
  }
}

TEST(TrainCliTest, WritesCheckpointsWithTheModelsNames) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  // --checkpoint_every=2 over 4 steps: steps 2 and 4, the newest two kept.
  const std::string ckpt = runs.dir + "/ckpt";
  std::set<std::string> files;
  for (const auto& entry : fs::directory_iterator(ckpt)) {
    files.insert(entry.path().filename().string());
  }
  EXPECT_EQ(files, (std::set<std::string>{"step_2.safetensors",
                                          "step_4.safetensors"}));
  absl::StatusOr<SafetensorsFile> file =
      ReadSafetensors(ckpt + "/step_4.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata.at("step"), "4");
  EXPECT_THAT(file->metadata.at("config"),
              AllOf(HasSubstr("context=128"), HasSubstr("d_model=32")));
  for (const char* name : {"embed.weight", "blocks.0.attn.q_proj.weight",
                           "blocks.1.attn.out_proj.weight",
                           "rng.dropout.offset", "data.position"}) {
    EXPECT_EQ(file->tensors.count(name), 1u) << name;
  }
  int optimizer_tensors = 0;
  for (const auto& [name, tensor] : file->tensors) {
    optimizer_tensors += absl::StartsWith(name, "optimizer.");
  }
  EXPECT_GT(optimizer_tensors, 0);
}

TEST(TrainCliTest, ResumeContinuesWithTheLossesOfAnUninterruptedRun) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.stopped.exit_code, 0) << runs.stopped.output;
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  ASSERT_EQ(runs.reference.exit_code, 0) << runs.reference.output;
  EXPECT_THAT(
      runs.resumed.output,
      AllOf(HasSubstr("resumed from " + runs.dir +
                      "/ckpt/step_2.safetensors at step 2"),
            HasSubstr("\nstep 3/4 | loss "), HasSubstr("\nstep 4/4 | loss "),
            HasSubstr("eval step 4: accuracy")));
  EXPECT_THAT(runs.resumed.output, ::testing::Not(HasSubstr("step 1/4")));
  // The metrics hold 9 significant digits: with dropout on, the stopped and
  // the resumed run's steps match the uninterrupted run's digit for digit.
  const auto reference = TrainLosses(ReadMetrics(runs.reference_metrics));
  const auto resumed = TrainLosses(ReadMetrics(runs.metrics));
  ASSERT_EQ(reference.size(), 4u);
  EXPECT_EQ(resumed, reference);
}

TEST(TrainCliTest, PlotMetricsWritesAPng) {
  const TinyRuns& runs = Runs();
  ASSERT_EQ(runs.resumed.exit_code, 0) << runs.resumed.output;
  if (access(kPython, X_OK) != 0) {
    GTEST_SKIP() << kPython << " (the interpreter of " << kPlot
                 << ") is absent; setup.sh installs python3-matplotlib";
  }
  if (RunProgram(kPython, {"-c", "import matplotlib"}).exit_code != 0) {
    GTEST_SKIP() << "matplotlib is absent for " << kPython
                 << "; setup.sh installs python3-matplotlib";
  }
  const std::string png = runs.dir + "/run.png";
  const Result plot = RunProgram(kPlot, {runs.metrics, png});
  ASSERT_EQ(plot.exit_code, 0) << plot.output;
  EXPECT_THAT(plot.output, HasSubstr("wrote " + png));
  // The PNG signature, then the IHDR chunk: width and height big-endian (a
  // 12 x 4.5 inch figure at 100 dpi).
  std::ifstream file(png, std::ios::binary);
  std::string head(24, '\0');
  file.read(head.data(), 24);
  ASSERT_TRUE(file.good()) << png << " is shorter than a PNG header";
  EXPECT_EQ(head.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(head.substr(12, 4), "IHDR");
  auto big_endian = [&](int at) {
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      value = value << 8 | static_cast<unsigned char>(head[at + i]);
    }
    return value;
  };
  EXPECT_EQ(big_endian(16), 1200u);
  EXPECT_EQ(big_endian(20), 450u);
}

// Runs the binary with `flags` (after the tiny ones) and expects exit status
// 1 and exactly one line of output containing every piece (the binary's own
// errors start with "train: ", absl's flag parser writes "ERROR: ...").
void ExpectTrainError(const std::vector<std::string>& flags,
                      const std::vector<std::string>& pieces) {
  SCOPED_TRACE(absl::StrJoin(flags, " "));
  const Result result = RunTrain(flags);
  EXPECT_EQ(result.exit_code, 1) << result.output;
  ASSERT_FALSE(result.output.empty());
  EXPECT_EQ(result.output.find('\n'), result.output.size() - 1)
      << "expected exactly one line, got:\n"
      << result.output;
  for (const std::string& piece : pieces) {
    EXPECT_THAT(result.output, HasSubstr(piece));
  }
}

TEST(TrainCliTest, BadFlagValue) {
  // Not a number: absl's parser says so.
  ExpectTrainError({"--steps=many"}, {"'many'", "steps"});
  // A number the trainer refuses.
  ExpectTrainError({"--steps=0"}, {"train: ", "steps 0", ">= 1"});
  ExpectTrainError({"--d_model=30"}, {"train: ", "d_model 30"});
  ExpectTrainError({"--attention=dilated", "--ranks=2"},
                   {"train: ", "ranks 2", "attention type dilated"});
  ExpectTrainError({"--norm=batchnorm"},
                   {"train: ", "--norm=batchnorm", "layernorm or rmsnorm"});
}

TEST(TrainCliTest, StrayArgument) {
  ExpectTrainError({"--steps=2", "stray"},
                   {"train: ", "unexpected argument \"stray\""});
}

TEST(TrainCliTest, MissingDataFile) {
  const std::string missing =
      absl::StrCat(::testing::TempDir(), "/no_such_corpus.txt");
  ExpectTrainError({"--steps=2", "--task=text", "--data=" + missing},
                   {"train: ", missing});
}

}  // namespace
}  // namespace lc
