// bazel run //experiments:scaling -- [--device=cpu|cuda] [--experiment=NAME]
// [--out_dir=DIR]: runs the scaling experiments (experiments/scaling.h),
// printing a line per configuration and a table per experiment, writes
// DIR/<experiment>.csv and, when /usr/bin/python3 has matplotlib (Debian's
// python3-matplotlib), DIR/<experiment>.png through plot_scaling.py. With
// no flags: CPU sizes, every experiment, a few minutes on 2 cores. --help
// lists every flag.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "core/cli.h"
#include "core/status.h"
#include "experiments/scaling.h"

ABSL_FLAG(std::string, device, "cpu",
          "cpu, cuda or cuda:N. The defaults of the size flags below depend "
          "on it: CPU sizes run in minutes on 2 cores, GPU sizes are the "
          "full form.");
ABSL_FLAG(std::string, experiment, "all",
          "all, or comma-separated names: memory_vs_ranks, time_vs_length, "
          "communication, max_context, tile_order.");
ABSL_FLAG(std::string, out_dir, "scaling_results",
          "Directory for <experiment>.csv and .png (created; relative to "
          "where bazel run was called).");
ABSL_FLAG(bool, plot, true,
          "Draw <experiment>.png with experiments/plot_scaling.py (needs "
          "/usr/bin/python3 with matplotlib).");
ABSL_FLAG(int32_t, threads, 0,
          "OpenMP threads per rank; 0: the cores divided among the ranks.");
ABSL_FLAG(int32_t, repeats, 3, "Timed calls per configuration (median).");
ABSL_FLAG(std::string, dtype, "",
          "Attention dtype: float32, float64 or bfloat16 (default float32 on "
          "cpu, bfloat16 on cuda; communication is always float32).");
ABSL_FLAG(int64_t, batch, 1, "Attention batch size.");
ABSL_FLAG(int64_t, heads, 0, "Attention heads (0: 4 on cpu, 8 on cuda).");
ABSL_FLAG(int64_t, head_dim, 0, "Head dimension (0: 32 on cpu, 64 on cuda).");
ABSL_FLAG(int64_t, n, 0,
          "Sequence length of memory_vs_ranks and communication (0: 8192 on "
          "cpu, 131072 on cuda).");
ABSL_FLAG(std::string, tile_order_lengths, "8192,32768",
          "tile_order: the sequence lengths.");
ABSL_FLAG(std::string, ranks, "1,2,4,8",
          "Rank counts of memory_vs_ranks and communication.");
ABSL_FLAG(std::string, dilation_rates, "1,2,4,8,16",
          "communication: dilation rates r of the pattern (w = n, r).");
ABSL_FLAG(int64_t, min_n, 1024, "time_vs_length: the first n.");
ABSL_FLAG(int64_t, max_n, 0,
          "time_vs_length: the largest n (0: 65536 on cpu, 4194304 on cuda).");
ABSL_FLAG(double, time_budget, 0,
          "time_vs_length: seconds per forward+backward call; a slower call "
          "ends its attention type's sweep (0: 4 on cpu, 2 on cuda).");
ABSL_FLAG(int64_t, memory_budget_mib, 0,
          "time_vs_length: MiB per call; a call that allocates more ends its "
          "attention type's sweep (0: 1024 on cpu, 65536 on cuda).");
ABSL_FLAG(int64_t, context_budget_mib, 0,
          "max_context: MiB per rank that a training step must fit in (0: 96 "
          "on cpu, 4096 on cuda, where the ranks share one GPU).");
ABSL_FLAG(std::string, max_context_ranks, "1,2,4", "max_context: rank counts.");
ABSL_FLAG(int64_t, context_step, 0,
          "max_context: contexts are multiples of this many tokens (0: 512 "
          "on cpu, 8192 on cuda).");

namespace lc {
namespace {

namespace fs = std::filesystem;

// The interpreter that has Debian's python3-matplotlib.
constexpr char kPython[] = "/usr/bin/python3";

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& flag,
                                               const std::string& text) {
  std::vector<int64_t> values;
  for (absl::string_view piece : absl::StrSplit(text, ',')) {
    int64_t value;
    if (!absl::SimpleAtoi(piece, &value) || value < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flag, "=", text, ": \"", piece,
          "\" is not a positive integer (expected a list such as 1,2,4)"));
    }
    values.push_back(value);
  }
  return values;
}

absl::StatusOr<std::vector<int>> ParseRanks(const std::string& flag,
                                            const std::string& text) {
  LC_ASSIGN_OR_RETURN(const std::vector<int64_t> values, ParseList(flag, text));
  return std::vector<int>(values.begin(), values.end());
}

absl::StatusOr<ScalingOptions> OptionsFromFlags() {
  LC_ASSIGN_OR_RETURN(const Device device,
                      ParseDeviceFlag(absl::GetFlag(FLAGS_device)));
  ScalingOptions options = DefaultScalingOptions(device);
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (!dtype.empty()) {
    bool known = false;
    for (DType d : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
      if (dtype == DTypeName(d)) {
        options.dtype = d;
        known = true;
      }
    }
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--dtype=", dtype, " (expected float32, float64 or bfloat16)"));
    }
  }
  options.threads = absl::GetFlag(FLAGS_threads);
  options.repeats = absl::GetFlag(FLAGS_repeats);
  options.batch = absl::GetFlag(FLAGS_batch);
  // A size flag of 0 keeps the device's default.
  auto set = [](auto value, auto& field) {
    if (value != 0) field = value;
  };
  set(absl::GetFlag(FLAGS_heads), options.heads);
  set(absl::GetFlag(FLAGS_head_dim), options.head_dim);
  set(absl::GetFlag(FLAGS_n), options.n);
  set(absl::GetFlag(FLAGS_max_n), options.max_n);
  set(absl::GetFlag(FLAGS_time_budget), options.time_budget_s);
  set(absl::GetFlag(FLAGS_memory_budget_mib) * 1048576, options.memory_budget);
  set(absl::GetFlag(FLAGS_context_budget_mib) * 1048576,
      options.context_budget);
  set(absl::GetFlag(FLAGS_context_step), options.context_step);
  options.min_n = absl::GetFlag(FLAGS_min_n);
  LC_ASSIGN_OR_RETURN(options.ranks,
                      ParseRanks("ranks", absl::GetFlag(FLAGS_ranks)));
  LC_ASSIGN_OR_RETURN(
      options.dilation_rates,
      ParseList("dilation_rates", absl::GetFlag(FLAGS_dilation_rates)));
  LC_ASSIGN_OR_RETURN(
      options.tile_order_lengths,
      ParseList("tile_order_lengths", absl::GetFlag(FLAGS_tile_order_lengths)));
  LC_ASSIGN_OR_RETURN(
      options.max_context_ranks,
      ParseRanks("max_context_ranks", absl::GetFlag(FLAGS_max_context_ranks)));
  options.progress = &std::cout;
  return options;
}

absl::StatusOr<std::vector<std::string>> ExperimentsFromFlag() {
  const std::string text = absl::GetFlag(FLAGS_experiment);
  if (text == "all") return ExperimentNames();
  std::vector<std::string> names;
  for (absl::string_view piece : absl::StrSplit(text, ',')) {
    const std::string name(piece);
    if (std::find(ExperimentNames().begin(), ExperimentNames().end(), name) ==
        ExperimentNames().end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--experiment=", text, ": no experiment \"", name,
                       "\" (expected all or some of ",
                       absl::StrJoin(ExperimentNames(), ", "), ")"));
    }
    names.push_back(name);
  }
  return names;
}

// Runs `program` with `args` and waits; its output goes to ours, or nowhere
// when `quiet`. Returns the exit status, -1 when it did not exit normally.
int Spawn(const std::string& program, const std::vector<std::string>& args,
          bool quiet) {
  std::cout.flush();
  std::vector<char*> argv = {const_cast<char*>(program.c_str())};
  for (const std::string& arg : args) {
    argv.push_back(const_cast<char*>(arg.c_str()));
  }
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (quiet) {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid;
  const int spawned = posix_spawn(&pid, program.c_str(), &actions, nullptr,
                                  argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// The plot script: in the runfiles tree (bazel run starts the binary at its
// root; a test has it as data) or next to the binary's runfiles.
std::string FindPlotScript(const std::string& argv0) {
  const std::string relative = "experiments/plot_scaling.py";
  std::vector<std::string> candidates = {relative};
  if (const char* runfiles = std::getenv("RUNFILES_DIR")) {
    candidates.push_back(absl::StrCat(runfiles, "/longctx/", relative));
  }
  candidates.push_back(absl::StrCat(argv0, ".runfiles/longctx/", relative));
  for (const std::string& path : candidates) {
    if (fs::is_regular_file(path)) return path;
  }
  return "";
}

// Empty when plots can be drawn; else why not.
std::string WhyNoPlots(const std::string& script) {
  if (script.empty()) {
    return "experiments/plot_scaling.py is not in the binary's runfiles (run "
           "it with bazel run)";
  }
  if (access(kPython, X_OK) != 0) {
    return absl::StrCat(kPython,
                        " is missing (apt-get install "
                        "python3-matplotlib, or ./setup.sh)");
  }
  if (Spawn(kPython, {"-c", "import matplotlib"}, true) != 0) {
    return absl::StrCat(kPython,
                        " cannot import matplotlib (apt-get install "
                        "python3-matplotlib, or ./setup.sh)");
  }
  return "";
}

absl::Status Run(const std::string& argv0) {
  LC_ASSIGN_OR_RETURN(const ScalingOptions options, OptionsFromFlags());
  LC_ASSIGN_OR_RETURN(const std::vector<std::string> names,
                      ExperimentsFromFlag());
  const std::string out_dir = UserPath(absl::GetFlag(FLAGS_out_dir));
  std::error_code error;
  fs::create_directories(out_dir, error);
  if (error) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--out_dir=", out_dir, ": cannot create it (", error.message(), ")"));
  }
  const std::string script = FindPlotScript(argv0);
  const std::string no_plots =
      absl::GetFlag(FLAGS_plot) ? WhyNoPlots(script) : "--plot=false";
  std::cout << "scaling experiments on " << options.device.ToString() << " ("
            << std::thread::hardware_concurrency() << " cores), "
            << absl::StrJoin(names, ", ") << "; results in " << out_dir << "\n";
  if (!no_plots.empty()) {
    std::cout << "plots: not drawn: " << no_plots
              << "; the CSVs are written, plot them later with " << kPython
              << " experiments/plot_scaling.py " << out_dir << "/*.csv\n";
  }
  std::vector<std::string> failed;
  for (const std::string& name : names) {
    const auto start = std::chrono::steady_clock::now();
    const absl::StatusOr<Table> table = RunExperiment(name, options);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    if (!table.ok()) {
      // Unimplemented: the experiment does not apply to this device.
      const bool skipped =
          table.status().code() == absl::StatusCode::kUnimplemented;
      std::cout << "[" << name << "] " << (skipped ? "skipped" : "FAILED")
                << ": "
                << absl::StrReplaceAll(table.status().message(), {{"\n", " "}})
                << "\n";
      if (!skipped) failed.push_back(name);
      continue;
    }
    std::cout << "\n"
              << name << " (" << absl::StrFormat("%.1f", seconds) << " s):\n"
              << FormatTable(*table);
    const std::string csv = absl::StrCat(out_dir, "/", name, ".csv");
    std::ofstream file(csv);
    file << TableCsv(*table);
    file.close();
    if (!file) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot write ", csv, " (check --out_dir)"));
    }
    std::cout << "wrote " << csv << "\n";
    if (no_plots.empty() && Spawn(kPython, {script, csv}, false) != 0) {
      std::cout << "[" << name << "] the plot script failed on " << csv << "\n";
      failed.push_back(absl::StrCat(name, " (plot)"));
    }
    std::cout << std::endl;
  }
  if (!failed.empty()) {
    return absl::InternalError(
        absl::StrCat(failed.size(), " of ", names.size(),
                     " experiments failed: ", absl::StrJoin(failed, ", ")));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Scaling experiments: memory per rank, time against length, ring "
      "communication, longest context in a memory budget, tile order.\n"
      "Usage: bazel run //experiments:scaling -- [--device=cpu|cuda] "
      "[--experiment=NAME] [--out_dir=DIR]; with no flags: CPU sizes, every "
      "experiment, a few minutes on 2 cores.");
  return lc::RunTool("scaling", argc, argv, [&] { return lc::Run(argv[0]); });
}
