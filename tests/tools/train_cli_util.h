// Helpers of the //train command-line tests: the binary's path, a tiny run's
// flags, fresh directories, and a reader of the JSONL metrics it writes.
#ifndef LONGCTX_TESTS_TOOLS_TRAIN_CLI_UTIL_H_
#define LONGCTX_TESTS_TOOLS_TRAIN_CLI_UTIL_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tests/tools/run_program.h"

namespace lc {
namespace testing {

// The binary and the plot script, relative to the test's working directory
// (the runfiles root).
inline constexpr char kTrain[] = "train/train";
inline constexpr char kPlot[] = "train/plot_metrics.py";
// The interpreter of the plot script's "#!" line.
inline constexpr char kPython[] = "/usr/bin/python3";

// A model and task that train in well under a second: 2 layers of width 32
// over 128 tokens, passkey retrieval aligned to the long dilated pattern,
// a checkpoint every 2 steps.
extern const std::vector<std::string> kTiny;

// An empty directory `name` under the test's temporary directory.
std::string FreshDir(const std::string& name);

// //train with kTiny followed by `flags`.
ProgramResult RunTrain(const std::vector<std::string>& flags);

// Expects exit status 1 and, as the last line of the output, one error line
// "train: ..." holding every piece. When `alone`, that line is the whole
// output; otherwise the lines a run printed before it failed may precede it,
// but no other error line.
void ExpectTrainError(const ProgramResult& result,
                      const std::vector<std::string>& pieces,
                      bool alone = true);

// One JSON object (a JSONL line) as name -> the raw text of the value;
// strings, nested arrays and objects are kept whole. Fails the test and
// returns what it has on text that is not one object.
using JsonObject = std::map<std::string, std::string>;
JsonObject ParseObject(const std::string& line);
std::set<std::string> Keys(const JsonObject& object);
// The member `name` as a number (fails the test when it is not one).
double Number(const JsonObject& object, const std::string& name);
// Every line of a metrics file, parsed.
std::vector<JsonObject> ReadMetrics(const std::string& path);
// The training loss of each step in `records`, as written (9 digits).
std::map<int64_t, std::string> TrainLosses(
    const std::vector<JsonObject>& records);

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_TOOLS_TRAIN_CLI_UTIL_H_
