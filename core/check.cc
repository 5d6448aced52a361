#include "core/check.h"

#include <cstdio>
#include <cstdlib>

namespace lc {
namespace internal {

void CheckFailed(const char* file, int line, const char* condition,
                 const std::string& details) {
  std::fprintf(stderr, "%s:%d: CHECK failed: %s %s\n", file, line, condition,
               details.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace internal
}  // namespace lc
