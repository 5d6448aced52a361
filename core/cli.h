// Helpers shared by the command-line tools: paths relative to where `bazel
// run` was called, the --device=cpu|cuda|cuda:N flag, integer-list flags,
// number flags that are off unless given, flag names in parse errors, and the
// body of a main() that parses flags, refuses positional arguments and prints a
// failure as one line on stderr (attention_cli, train and scaling use them).
#ifndef LONGCTX_CORE_CLI_H_
#define LONGCTX_CORE_CLI_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/device.h"

namespace lc {

// `bazel run` starts the binary in its runfiles tree; a relative path means
// one relative to where the user ran it, BUILD_WORKING_DIRECTORY. Returns
// `path` unchanged when it is empty or absolute, or when that variable is not
// set (the binary was not started by `bazel run`).
std::string UserPath(const std::string& path);

// The value of a --device flag: "cpu", "cuda" (device 0) or "cuda:N" with
// N >= 0. InvalidArgumentError for any other text, and for a CUDA device
// this machine does not have (the message names the flag value and
// CudaDeviceCount()).
absl::StatusOr<Device> ParseDeviceFlag(const std::string& text);

// The value of an integer-list flag --FLAG=TEXT: "2048,4096" -> {2048, 4096},
// "" -> {}. InvalidArgumentError naming the flag, the text and the piece
// that is not an integer.
absl::StatusOr<std::vector<int64_t>> ParseIntListFlag(absl::string_view flag,
                                                      const std::string& text);

// The value of an optional number flag whose absence means "off" (such as
// --softcap): 0 when the flag is not given (std::nullopt), else the value
// given, which must be a finite number > 0 (InvalidArgumentError naming
// --FLAG=VALUE otherwise: off is asked for by leaving the flag out).
absl::StatusOr<double> PositiveFlagIfGiven(absl::string_view flag,
                                           const std::optional<double>& value);

// The benchmarks' answer to a bad flag or a failed check: prints
// "NAME: message" on stderr and exits with status 2.
[[noreturn]] void ExitWithError(const char* name, const std::string& message);

// The items of a list flag (absl's std::vector<std::string> flags, "a,b,c")
// as positive integers; any other item is ExitWithError(name, "--FLAG has
// \"ITEM\" (expected positive integers)").
std::vector<int64_t> PositiveIntegersOrExit(
    const char* name, const char* flag, const std::vector<std::string>& items);

// `parsed` with its error, if any, prefixed by "--FLAG: ".
template <typename T>
absl::StatusOr<T> ForFlag(absl::string_view flag, absl::StatusOr<T> parsed) {
  if (parsed.ok()) return parsed;
  return absl::Status(
      parsed.status().code(),
      absl::StrCat("--", flag, ": ", parsed.status().message()));
}

// The body of a tool's main(): parses the flags (absl::ParseCommandLine; call
// absl::SetProgramUsageMessage first), refuses positional arguments, calls
// `run` and returns 0 when it succeeds. A failure is printed to stderr as one
// line, "NAME: message" (newlines in the message become spaces), and returns
// 1; so is an lc::Error or a failed allocation (std::bad_alloc: "NAME: out of
// memory: ...") that escapes `run`.
int RunTool(const char* name, int argc, char** argv,
            absl::FunctionRef<absl::Status()> run);

}  // namespace lc

#endif  // LONGCTX_CORE_CLI_H_
