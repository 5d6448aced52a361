// Runs a program as a subprocess for the command-line tests (attention_cli,
// train, scaling): its exit code and everything it printed.
#ifndef LONGCTX_TESTS_TOOLS_RUN_PROGRAM_H_
#define LONGCTX_TESTS_TOOLS_RUN_PROGRAM_H_

#include <string>
#include <utility>
#include <vector>

namespace lc {
namespace testing {

struct ProgramResult {
  int exit_code = -1;  // -1 when the process did not exit normally
  std::string output;  // stdout and stderr together
};

// Runs `program` with `args`, each passed as one shell word, and the
// environment variables `env` (name, value) added, and collects what it
// prints through a pipe (so stdout is not a terminal). A failure to start
// is a test failure.
ProgramResult RunProgram(
    const std::string& program, const std::vector<std::string>& args,
    const std::vector<std::pair<std::string, std::string>>& env = {});

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_TOOLS_RUN_PROGRAM_H_
