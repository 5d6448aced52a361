#include "core/cli.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "core/cuda.h"
#include "core/status.h"

namespace lc {

std::string UserPath(const std::string& path) {
  const char* dir = std::getenv("BUILD_WORKING_DIRECTORY");
  if (dir == nullptr || path.empty() || path.front() == '/') return path;
  return absl::StrCat(dir, "/", path);
}

absl::StatusOr<Device> ParseDeviceFlag(const std::string& text) {
  if (text == "cpu") return Device::Cpu();
  int index = 0;
  absl::string_view rest = text;
  if (text != "cuda" && !(absl::ConsumePrefix(&rest, "cuda:") &&
                          absl::SimpleAtoi(rest, &index) && index >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device=", text, " (expected cpu, cuda or cuda:N)"));
  }
  const int count = CudaDeviceCount();
  if (index >= count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device=", text, ": this machine has ", count,
        " CUDA devices (expected a CUDA device to exist, or --device=cpu)"));
  }
  return Device::Cuda(index);
}

absl::StatusOr<std::vector<int64_t>> ParseIntListFlag(absl::string_view flag,
                                                      const std::string& text) {
  std::vector<int64_t> values;
  if (text.empty()) return values;
  for (absl::string_view piece : absl::StrSplit(text, ',')) {
    int64_t value;
    if (!absl::SimpleAtoi(piece, &value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flag, "=", text, ": \"", piece,
          "\" is not an integer (expected comma-separated integers such as "
          "2048,4096)"));
    }
    values.push_back(value);
  }
  return values;
}

absl::StatusOr<double> PositiveFlagIfGiven(absl::string_view flag,
                                           const std::optional<double>& value) {
  if (!value.has_value()) return 0.0;
  if (*value > 0 && std::isfinite(*value)) return *value;
  return absl::InvalidArgumentError(absl::StrCat(
      "--", flag, "=", *value, " (expected a finite number > 0; without --",
      flag, " it is off)"));
}

void ExitWithError(const char* name, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", name, message.c_str());
  std::exit(2);
}

std::vector<int64_t> PositiveIntegersOrExit(
    const char* name, const char* flag, const std::vector<std::string>& items) {
  std::vector<int64_t> values;
  for (const std::string& item : items) {
    int64_t value;
    if (!absl::SimpleAtoi(item, &value) || value < 1) {
      ExitWithError(name, absl::StrCat("--", flag, " has \"", item,
                                       "\" (expected positive integers)"));
    }
    values.push_back(value);
  }
  return values;
}

int RunTool(const char* name, int argc, char** argv,
            absl::FunctionRef<absl::Status()> run) {
  const std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  absl::Status status;
  if (args.size() > 1) {
    status = absl::InvalidArgumentError(
        absl::StrCat("unexpected argument \"", args[1],
                     "\" (expected only flags of the form --name=value)"));
  } else {
    // An allocation that fails anywhere in the tool (a size no check
    // foresaw) ends it with one line instead of "terminate called ...".
    const absl::Status thrown = StatusFromCall([&] { status = run(); });
    if (!thrown.ok()) status = thrown;
  }
  if (status.ok()) return 0;
  // One line, whatever the message holds.
  std::cerr << name << ": "
            << absl::StrReplaceAll(status.message(), {{"\n", " "}}) << "\n";
  return 1;
}

}  // namespace lc
