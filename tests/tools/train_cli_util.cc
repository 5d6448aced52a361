#include "tests/tools/train_cli_util.h"

#include <filesystem>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"

namespace lc {
namespace testing {

namespace fs = std::filesystem;

void ExpectTrainError(const ProgramResult& result,
                      const std::vector<std::string>& pieces, bool alone) {
  EXPECT_EQ(result.exit_code, 1) << result.output;
  ASSERT_FALSE(result.output.empty());
  ASSERT_EQ(result.output.back(), '\n') << result.output;
  const std::vector<std::string> lines =
      absl::StrSplit(result.output, '\n', absl::SkipEmpty());
  if (alone) {
    EXPECT_EQ(lines.size(), 1u) << "expected exactly one line, got:\n"
                                << result.output;
  }
  int errors = 0;
  for (const std::string& line : lines) {
    errors += absl::StartsWith(line, "train: ");
  }
  EXPECT_EQ(errors, 1) << result.output;
  const std::string& error = lines.back();
  EXPECT_TRUE(absl::StartsWith(error, "train: ")) << result.output;
  for (const std::string& piece : pieces) {
    EXPECT_NE(error.find(piece), std::string::npos)
        << "\"" << piece << "\" is not in the error line: " << error;
  }
}

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

ProgramResult RunTrain(const std::vector<std::string>& flags) {
  std::vector<std::string> args = kTiny;
  args.insert(args.end(), flags.begin(), flags.end());
  return RunProgram(kTrain, args);
}

// The members of one JSON object (a JSONL line) as name -> the raw text of
// the value; strings, nested arrays and objects are kept whole. Fails the
// test and returns what it has on text that is not one object.
JsonObject ParseObject(const std::string& line) {
  JsonObject members;
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

std::set<std::string> Keys(const JsonObject& object) {
  std::set<std::string> keys;
  for (const auto& [name, value] : object) keys.insert(name);
  return keys;
}

double Number(const JsonObject& object, const std::string& name) {
  double value = 0;
  EXPECT_TRUE(object.count(name) != 0 &&
              absl::SimpleAtod(object.at(name), &value))
      << name << " is not a number in the record";
  return value;
}

std::vector<JsonObject> ReadMetrics(const std::string& path) {
  std::ifstream file(path);
  EXPECT_TRUE(file.good()) << "no metrics file " << path;
  std::vector<JsonObject> records;
  for (std::string line; std::getline(file, line);) {
    records.push_back(ParseObject(line));
  }
  return records;
}

// The training loss of each step in `records`, as written (9 digits).
std::map<int64_t, std::string> TrainLosses(
    const std::vector<JsonObject>& records) {
  std::map<int64_t, std::string> losses;
  for (const auto& record : records) {
    if (record.count("kind") != 0 && record.at("kind") == "\"train\"") {
      losses[static_cast<int64_t>(Number(record, "step"))] = record.at("loss");
    }
  }
  return losses;
}

}  // namespace testing
}  // namespace lc
