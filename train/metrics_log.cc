#include "train/metrics_log.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "core/files.h"
#include "core/memory.h"
#include "core/status.h"

namespace lc {
namespace train_internal {
namespace {

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::lround(seconds));
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
}

std::string FormatBytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 30)) {
    return absl::StrFormat("%.2f GiB", bytes / double(int64_t{1} << 30));
  }
  return absl::StrFormat("%.0f MiB", bytes / double(1 << 20));
}

std::string FormatRate(double tokens_per_s) {
  if (tokens_per_s >= 1e6) return absl::StrFormat("%.2fM", tokens_per_s / 1e6);
  if (tokens_per_s >= 1e3) return absl::StrFormat("%.1fk", tokens_per_s / 1e3);
  return absl::StrFormat("%.0f", tokens_per_s);
}

// A JSON number, or null for one that is not finite: strict JSON parsers
// refuse NaN and Infinity.
std::string JsonNumber(double x) {
  if (!std::isfinite(x)) return "null";
  return absl::StrFormat("%.9g", x);
}

// The step of a metrics record (its "step" member); none when it has none.
std::optional<int64_t> RecordStep(absl::string_view record) {
  constexpr absl::string_view kMember = "\"step\": ";
  const size_t at = record.find(kMember);
  if (at == absl::string_view::npos) return std::nullopt;
  absl::string_view value = record.substr(at + kMember.size());
  value = value.substr(0, value.find_first_of(",}"));
  int64_t step = 0;
  if (!absl::SimpleAtoi(value, &step)) return std::nullopt;
  return step;
}

}  // namespace

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

double Printable(double x) {
  return std::isnan(x) ? std::numeric_limits<double>::quiet_NaN() : x;
}

absl::Status Reporter::Open() {
  if (options_.metrics_path.empty()) return absl::OkStatus();
  metrics_.open(options_.metrics_path, std::ios::app);
  if (!metrics_) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open the metrics file ", options_.metrics_path,
                     " for appending"));
  }
  return absl::OkStatus();
}

void Reporter::Line(const std::string& text) {
  if (options_.progress == nullptr) return;
  EndInPlace();
  *options_.progress << text << "\n" << std::flush;
}

absl::Status Reporter::Start(int64_t first_step, int64_t last_step) {
  start_ = interval_start_ = Clock::now();
  first_step_ = first_step;
  last_step_ = last_step;
  if (first_step == 0 || !metrics_.is_open()) return absl::OkStatus();
  LC_ASSIGN_OR_RETURN(const int64_t dropped, DropRecordsAfter(first_step));
  if (dropped > 0) {
    Line(absl::StrCat("metrics: dropped ", dropped,
                      " record(s) of steps after ", first_step, " from ",
                      options_.metrics_path,
                      " (the interrupted run's; they are redone now)"));
  }
  return Write(absl::StrFormat(
      "{\"kind\": \"resume\", \"step\": %d, \"dropped_records\": %d}",
      first_step, dropped));
}

absl::Status Reporter::Step(const StepRecord& record, int64_t skipped) {
  if (!record.skipped) {
    interval_loss_ += record.loss;
    ++interval_losses_;
  }
  ++interval_steps_;
  const bool log_due =
      record.step % options_.log_every == 0 || record.step == last_step_;
  const double elapsed = Seconds(start_);
  const double interval = Seconds(interval_start_);
  const double rate =
      interval > 0
          ? tokens_per_step_ * static_cast<double>(interval_steps_) / interval
          : 0;
  const int64_t done = record.step - first_step_;
  const double eta = done > 0 ? elapsed / done * (last_step_ - record.step)
                              : std::numeric_limits<double>::quiet_NaN();
  const int64_t peak = DeviceMemoryStats(options_.model.device).peak_bytes;
  std::string text = absl::StrFormat(
      "step %*d/%d | loss %.4f | lr %.2e | %s tok/s | %s elapsed, ETA %s | "
      "peak %s",
      static_cast<int>(absl::StrCat(options_.steps).size()), record.step,
      options_.steps, Printable(record.loss), record.lr, FormatRate(rate),
      FormatDuration(elapsed), FormatDuration(eta), FormatBytes(peak));
  if (skipped > 0) {
    absl::StrAppend(&text, " | skipped ", skipped, " non-finite step",
                    skipped > 1 ? "s" : "");
  }
  if (options_.progress != nullptr) {
    if (options_.progress_in_place) {
      // Pad so that a shorter line fully covers the previous one.
      *options_.progress << "\r" << text
                         << std::string(
                                std::max<int64_t>(0, last_width_ - text.size()),
                                ' ')
                         << std::flush;
      last_width_ = static_cast<int64_t>(text.size());
      in_place_open_ = true;
    } else if (log_due) {
      *options_.progress << text << "\n" << std::flush;
    }
  }
  if (!log_due) return absl::OkStatus();
  // The mean loss of the interval's steps that made an update (null when
  // every one was skipped).
  const double loss = interval_losses_ > 0
                          ? interval_loss_ / interval_losses_
                          : std::numeric_limits<double>::quiet_NaN();
  std::string record_text = absl::StrFormat(
      "{\"kind\": \"train\", \"step\": %d, \"loss\": %s, \"lr\": %s, "
      "\"grad_norm\": %s, \"tokens_per_s\": %s, \"elapsed_s\": %s, "
      "\"peak_bytes\": %d",
      record.step, JsonNumber(loss), JsonNumber(record.lr),
      JsonNumber(record.grad_norm), JsonNumber(rate), JsonNumber(elapsed),
      peak);
  if (options_.skip_nonfinite_steps > 0) {
    absl::StrAppend(&record_text, ", \"skipped_steps\": ", skipped);
  }
  interval_start_ = Clock::now();
  interval_loss_ = 0;
  interval_losses_ = 0;
  interval_steps_ = 0;
  return Write(record_text + "}");
}

absl::Status Reporter::Eval(const EvalResult& eval, bool synthetic) {
  std::string text;
  if (synthetic) {
    std::vector<std::string> buckets;
    for (const DistanceBucket& b : eval.buckets) {
      buckets.push_back(absl::StrFormat("%d-%d: %.1f%%", b.min_distance,
                                        b.max_distance, 100 * b.accuracy));
    }
    text = absl::StrFormat(
        "eval step %d: accuracy %.1f%% (chance %.1f%%) on %d answers, "
        "loss %.4f | by distance %s",
        eval.step, 100 * eval.accuracy, 100 * eval.chance, eval.answers,
        Printable(eval.loss), absl::StrJoin(buckets, ", "));
  } else {
    text = absl::StrFormat(
        "eval step %d: loss %.4f nats/byte (%.3f bits/byte) on evaluation "
        "windows",
        eval.step, Printable(eval.loss), Printable(eval.loss) / std::log(2.0));
  }
  Line(text);
  std::vector<std::string> buckets;
  for (const DistanceBucket& b : eval.buckets) {
    buckets.push_back(absl::StrFormat(
        "{\"min\": %d, \"max\": %d, \"answers\": %d, \"accuracy\": %s}",
        b.min_distance, b.max_distance, b.answers, JsonNumber(b.accuracy)));
  }
  return Write(
      absl::StrFormat("{\"kind\": \"eval\", \"step\": %d, \"loss\": %s, "
                      "\"accuracy\": %s, \"chance\": %s, \"answers\": %d, "
                      "\"accuracy_by_distance\": [%s]}",
                      eval.step, JsonNumber(eval.loss),
                      synthetic ? JsonNumber(eval.accuracy) : "null",
                      synthetic ? JsonNumber(eval.chance) : "null",
                      eval.answers, absl::StrJoin(buckets, ", ")));
}

void Reporter::EndInPlace() {
  if (in_place_open_ && options_.progress != nullptr) {
    *options_.progress << "\n";
    in_place_open_ = false;
    last_width_ = 0;
  }
}

absl::Status Reporter::Write(const std::string& record) {
  if (!metrics_.is_open()) return absl::OkStatus();
  errno = 0;
  metrics_ << record << "\n" << std::flush;
  if (!metrics_) {
    return absl::ErrnoToStatus(
        errno != 0 ? errno : EIO,
        absl::StrCat("cannot write the metrics file ", options_.metrics_path));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Reporter::DropRecordsAfter(int64_t step) {
  const std::string& path = options_.metrics_path;
  struct stat info;
  if (stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) return 0;
  std::string kept;
  int64_t dropped = 0;
  {
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      const std::optional<int64_t> line_step = RecordStep(line);
      if ((line_step && *line_step > step) || line.back() != '}') {
        ++dropped;
      } else {
        absl::StrAppend(&kept, line, "\n");
      }
    }
    if (in.bad()) {
      return absl::DataLossError(
          absl::StrCat("cannot read the metrics file ", path, " to resume it"));
    }
  }
  if (dropped == 0) return 0;
  metrics_.close();
  LC_RETURN_IF_ERROR(WriteFileAtomically("metrics file", path, {kept}));
  metrics_.open(path, std::ios::app);
  if (!metrics_) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open the metrics file ", path, " for appending"));
  }
  return dropped;
}

}  // namespace train_internal
}  // namespace lc
