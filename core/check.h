// CHECK macros for internal invariants: on failure they print file, line, the
// condition and the values involved, then abort. Errors a user can cause are
// reported through lc::Error / absl::Status instead (see core/status.h).
#ifndef LONGCTX_CORE_CHECK_H_
#define LONGCTX_CORE_CHECK_H_

#include <sstream>
#include <string>

namespace lc {
namespace internal {

[[noreturn]] void CheckFailed(const char* file, int line, const char* condition,
                              const std::string& details);

// Streams extra context into the failure message: LC_CHECK(x) << "n=" << n.
class CheckMessage {
 public:
  CheckMessage(const char* file, int line, const char* condition)
      : file_(file), line_(line), condition_(condition) {}
  ~CheckMessage() { CheckFailed(file_, line_, condition_, stream_.str()); }
  std::ostream& stream() { return stream_; }

 private:
  const char* file_;
  int line_;
  const char* condition_;
  std::ostringstream stream_;
};

// Makes `LC_CHECK(c) << ...` a void expression so it works in any statement
// position.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace lc

#define LC_CHECK(condition)                                              \
  (condition)                                                            \
      ? (void)0                                                          \
      : ::lc::internal::Voidify() &                                      \
            ::lc::internal::CheckMessage(__FILE__, __LINE__, #condition) \
                .stream()

#define LC_CHECK_OP_IMPL(a, b, op)                                       \
  LC_CHECK((a)op(b)) << "(" << #a << " = " << (a) << ", " << #b << " = " \
                     << (b) << ") "

#define LC_CHECK_EQ(a, b) LC_CHECK_OP_IMPL(a, b, ==)
#define LC_CHECK_NE(a, b) LC_CHECK_OP_IMPL(a, b, !=)
#define LC_CHECK_LT(a, b) LC_CHECK_OP_IMPL(a, b, <)
#define LC_CHECK_LE(a, b) LC_CHECK_OP_IMPL(a, b, <=)
#define LC_CHECK_GT(a, b) LC_CHECK_OP_IMPL(a, b, >)
#define LC_CHECK_GE(a, b) LC_CHECK_OP_IMPL(a, b, >=)

#endif  // LONGCTX_CORE_CHECK_H_
