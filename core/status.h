// Error reporting: absl::Status helpers (LC_RETURN_IF_ERROR,
// LC_ASSIGN_OR_RETURN) and lc::Error, the one exception type that ops and
// tensor methods throw for errors a user can cause (bad shapes, dtype or
// device mixes, out-of-range indices). Functions that touch files or parse
// options return absl::Status / absl::StatusOr instead; StatusFromCall turns a
// throwing call (lc::Error, or an allocation that failed) into a Status at an
// API edge.
#ifndef LONGCTX_CORE_STATUS_H_
#define LONGCTX_CORE_STATUS_H_

#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace lc {

// The exception thrown by ops for user errors. It carries an absl::Status
// whose message names the op, the offending value and what was expected.
class Error : public std::runtime_error {
 public:
  explicit Error(absl::Status status)
      : std::runtime_error(status.ToString()), status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Throws lc::Error(InvalidArgument) with the concatenated message.
template <typename... Args>
[[noreturn]] void ThrowInvalidArgument(const Args&... args) {
  throw Error(absl::InvalidArgumentError(absl::StrCat(args...)));
}

// Throws a Status as lc::Error when it is not OK.
inline void ThrowIfError(absl::Status status) {
  if (!status.ok()) throw Error(std::move(status));
}

// Runs `fn` and converts an lc::Error it throws into the carried Status, and
// a failed allocation (std::bad_alloc, or std::length_error from a container
// asked for more elements than it can hold) into ResourceExhausted: sizes
// come from users, so running out of memory is their error, not a crash.
template <typename Fn>
absl::Status StatusFromCall(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.status();
  } catch (const std::bad_alloc& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of memory: an allocation failed (", e.what(),
                     "; expected sizes that fit this machine's memory)"));
  } catch (const std::length_error& e) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory: a size exceeds what a container can hold (", e.what(),
        ")"));
  }
  return absl::OkStatus();
}

}  // namespace lc

// Throws lc::Error(InvalidArgument) unless `condition` holds; the remaining
// arguments are concatenated with absl::StrCat into the message.
#define LC_REQUIRE(condition, ...)                             \
  do {                                                         \
    if (!(condition)) ::lc::ThrowInvalidArgument(__VA_ARGS__); \
  } while (false)

#define LC_STATUS_CONCAT_INNER(a, b) a##b
#define LC_STATUS_CONCAT(a, b) LC_STATUS_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function if `expr` is not OK.
#define LC_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::absl::Status lc_status_ = (expr);      \
    if (!lc_status_.ok()) return lc_status_; \
  } while (false)

// `LC_ASSIGN_OR_RETURN(auto x, MakeX());` assigns the value of a StatusOr or
// returns its error Status from the enclosing function.
#define LC_ASSIGN_OR_RETURN(lhs, expr) \
  LC_ASSIGN_OR_RETURN_IMPL(LC_STATUS_CONCAT(lc_statusor_, __LINE__), lhs, expr)
#define LC_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()

#endif  // LONGCTX_CORE_STATUS_H_
