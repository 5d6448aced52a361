// The training command: bazel run //train -- [flags]. With no flags it
// trains a small transformer on CPU on passkey retrieval over a context of
// 4096 bytes and shows, by evaluation accuracy per distance, that the model
// retrieves evidence thousands of tokens back; --device=cuda trains the same
// model on a GPU in bfloat16 mixed precision. --help lists every flag.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "attention/attention_config.h"
#include "attention/pattern.h"
#include "core/cli.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "models/transformer_lm.h"
#include "train/data.h"
#include "train/trainer.h"

// Run length and model.
ABSL_FLAG(int64_t, steps, 240, "Optimizer steps of the run.");
ABSL_FLAG(int64_t, batch, 4, "Sequences per step.");
ABSL_FLAG(int64_t, context, 4096, "Tokens (bytes) per sequence.");
ABSL_FLAG(int64_t, d_model, 64, "Model width.");
ABSL_FLAG(int64_t, layers, 2, "Transformer blocks.");
ABSL_FLAG(int64_t, heads, 4,
          "Attention heads (must divide d_model; head_dim must be even).");
ABSL_FLAG(std::string, norm, "layernorm", "Block norm: layernorm or rmsnorm.");
ABSL_FLAG(bool, tied, true,
          "Tie the output head to the token embedding (--notied: separate "
          "lm_head.weight).");
ABSL_FLAG(double, dropout, 0, "Residual and MLP dropout probability.");
ABSL_FLAG(double, attention_dropout, 0,
          "Dropout probability on the attention weights; with --ranks=K every "
          "rank drops the pairs one rank would (the ring draws one stream).");
ABSL_FLAG(bool, recompute, false,
          "Recompute each block's activations in backward instead of storing "
          "them (less memory, ~1/3 more compute; same results).");

// Attention.
ABSL_FLAG(std::string, attention, "ring_dilated",
          "Attention type: ring_dilated, ring_block_sparse (any --ranks), "
          "dilated, block_sparse, dense (one rank only).");
ABSL_FLAG(std::string, segment_lengths, "256,4096",
          "Dilated segment lengths w, comma-separated (LongNet: one pattern "
          "per head group).");
ABSL_FLAG(std::string, dilation_rates, "1,16",
          "Dilation rates r, one per segment length.");
ABSL_FLAG(std::string, attention_backend, "auto",
          "Attention kernels on CUDA: auto (cuDNN's fused attention where it "
          "applies, else ours), own or cudnn.");
ABSL_FLAG(bool, deterministic, false,
          "Bit-reproducible GPU gradients (attention's backward then runs on "
          "our kernels: cuDNN's adds with atomics).");
ABSL_FLAG(std::string, head_layout, "head_groups",
          "head_groups (dilated-attention-pytorch) or all_heads (LongNet).");
ABSL_FLAG(int64_t, window_left, -1,
          "Sliding window of every layer's attention: token t attends tokens "
          "u >= t - window_left, intersected with the pattern; -1: "
          "unlimited.");
ABSL_FLAG(int64_t, window_right, -1,
          "Sliding window: token t attends tokens u <= t + window_right; "
          "-1: unlimited. No effect on this causal model (it attends no u > "
          "t), but recorded in checkpoints like the other settings.");
ABSL_FLAG(std::optional<double>, softcap, std::nullopt,
          "Soft-capping of every layer's attention scores (Gemma 2): s "
          "becomes softcap * tanh(s / softcap) before the softmax. Off unless "
          "given; a value given must be > 0.");
ABSL_FLAG(int64_t, ranks, 1,
          "Context-parallel thread ranks: each holds context/ranks tokens; "
          "gives the same losses as 1 rank up to float32 rounding (also with "
          "--attention_dropout; not with --dropout > 0: each rank draws the "
          "masks of its own tokens).");
ABSL_FLAG(std::string, layout, "contiguous",
          "How the sequence is cut among ranks: contiguous or zigzag.");

// Data.
ABSL_FLAG(std::string, task, "passkey",
          "passkey (find one key byte), recall (key-value pairs) or text "
          "(--data file).");
ABSL_FLAG(std::string, data, "", "Text file for --task=text, read as bytes.");
ABSL_FLAG(int64_t, distance, 0,
          "Largest evidence-to-query distance in tokens; queries are drawn at "
          "distances 1..distance (0: as far as the context allows).");
ABSL_FLAG(int64_t, queries, 16, "Synthetic tasks: answers per sequence.");
ABSL_FLAG(int64_t, keys, 16,
          "Passkey: number of possible keys (chance accuracy = 1/keys).");
ABSL_FLAG(int64_t, pairs, 4, "Recall: key-value pairs per sequence.");
ABSL_FLAG(bool, align, true,
          "Synthetic tasks: put evidence and queries on the positions the "
          "longest dilated pattern selects (t mod r == o), so one head can "
          "read the evidence from the query at any distance.");

// Optimization.
ABSL_FLAG(double, lr, 3e-3, "Peak learning rate (AdamW).");
ABSL_FLAG(double, min_lr, 3e-4, "Learning rate at the end of cosine decay.");
ABSL_FLAG(int64_t, warmup, 20, "Linear warmup steps.");
ABSL_FLAG(double, weight_decay, 0.01,
          "AdamW decoupled weight decay (matrices only).");
ABSL_FLAG(double, clip, 1.0, "Max global gradient norm (0: no clipping).");
ABSL_FLAG(int64_t, skip_nonfinite_steps, 0,
          "A step whose loss or gradient norm is NaN or infinite (a diverging "
          "run) makes no update. 0: it stops the run with an error; N: up to "
          "N such steps are skipped, counted in the progress line and the "
          "metrics (skipped_steps), and the run stops at the next one.");
ABSL_FLAG(uint64_t, seed, 0, "Seed of the weights, the data and dropout.");

// Checkpoints, evaluation, output.
ABSL_FLAG(std::string, checkpoint_dir, "",
          "Directory for step_<N>.safetensors checkpoints (empty: none).");
ABSL_FLAG(int64_t, checkpoint_every, 50,
          "Checkpoint every N steps (0: only at the end).");
ABSL_FLAG(bool, resume, false,
          "Continue exactly from the newest checkpoint in --checkpoint_dir.");
ABSL_FLAG(std::string, resume_from, "",
          "Continue exactly from this checkpoint of --checkpoint_dir instead "
          "of the newest (what --resume suggests when the newest is corrupt).");
ABSL_FLAG(bool, overwrite_checkpoints, false,
          "Start a new run in a --checkpoint_dir that holds another run's "
          "checkpoints, deleting them first (without it such a directory is "
          "refused).");
ABSL_FLAG(int64_t, stop_after, 0,
          "Stop after this many steps as if interrupted (checkpointing "
          "there); 0: run all --steps.");
ABSL_FLAG(std::string, metrics, "",
          "JSONL file to append metrics to (one object per log step and per "
          "evaluation; a number that is not finite is null); plot with "
          "train/plot_metrics.py. --resume first drops the records of steps "
          "after the checkpoint's and appends {\"kind\": \"resume\", "
          "\"step\": S}, so each step appears once. A failed write stops "
          "the run.");
ABSL_FLAG(int64_t, eval_every, 40,
          "Evaluate every N steps (0: only at the end).");
ABSL_FLAG(int64_t, eval_batches, 8,
          "Batches per evaluation (of --batch sequences each).");
ABSL_FLAG(int64_t, log_every, 10,
          "Steps between progress lines (when not on a terminal) and metrics "
          "records.");
ABSL_FLAG(int32_t, threads, 1,
          "OpenMP threads per rank (0: cores / ranks; at most 1024 over all "
          "ranks). 1 keeps training fast when other processes share the "
          "cores (OpenMP threads spin at barriers); on an idle machine 0 may "
          "be faster.");
ABSL_FLAG(std::string, device, "cpu",
          "cpu, or cuda / cuda:N: train on that GPU (parameters, gradients "
          "and AdamW state on the device).");
ABSL_FLAG(std::string, dtype, "",
          "Compute dtype: bfloat16 (mixed precision: bfloat16 activations, "
          "GEMMs and attention, float32 master weights and AdamW state) or "
          "float32. Empty: bfloat16 on cuda, float32 on cpu (where bfloat16 "
          "is not offered: the CPU computes it by converting to float32).");

namespace lc {
namespace {

absl::StatusOr<DType> ParseComputeDType(const std::string& text,
                                        Device device) {
  if (text.empty()) {
    return device.is_cuda() ? DType::kBFloat16 : DType::kFloat32;
  }
  if (text == "float32") return DType::kFloat32;
  if (text == "bfloat16" && device.is_cuda()) return DType::kBFloat16;
  if (text == "bfloat16") {
    return absl::InvalidArgumentError(
        "--dtype=bfloat16 needs --device=cuda (the CPU computes bfloat16 by "
        "converting to float32: slower than float32, and no more accurate)");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype=", text, " (expected bfloat16 or float32)"));
}

absl::StatusOr<TrainOptions> OptionsFromFlags() {
  TrainOptions options;
  TransformerConfig& model = options.model;
  LC_ASSIGN_OR_RETURN(model.device,
                      ParseDeviceFlag(absl::GetFlag(FLAGS_device)));
  LC_ASSIGN_OR_RETURN(
      model.dtype, ParseComputeDType(absl::GetFlag(FLAGS_dtype), model.device));
  model.context = absl::GetFlag(FLAGS_context);
  model.d_model = absl::GetFlag(FLAGS_d_model);
  model.num_layers = absl::GetFlag(FLAGS_layers);
  model.num_heads = absl::GetFlag(FLAGS_heads);
  const std::string norm = absl::GetFlag(FLAGS_norm);
  if (norm == "layernorm") {
    model.norm = TransformerConfig::Norm::kLayerNorm;
  } else if (norm == "rmsnorm") {
    model.norm = TransformerConfig::Norm::kRMSNorm;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--norm=", norm, " (expected layernorm or rmsnorm)"));
  }
  model.tied_embeddings = absl::GetFlag(FLAGS_tied);
  model.dropout = absl::GetFlag(FLAGS_dropout);
  model.recompute = absl::GetFlag(FLAGS_recompute);

  AttentionConfig& attention = model.attention;
  LC_ASSIGN_OR_RETURN(
      attention.type,
      ForFlag("attention", ParseAttentionType(absl::GetFlag(FLAGS_attention))));
  LC_ASSIGN_OR_RETURN(attention.dilated.segment_lengths,
                      ParseIntListFlag("segment_lengths",
                                       absl::GetFlag(FLAGS_segment_lengths)));
  LC_ASSIGN_OR_RETURN(
      attention.dilated.dilation_rates,
      ParseIntListFlag("dilation_rates", absl::GetFlag(FLAGS_dilation_rates)));
  LC_ASSIGN_OR_RETURN(
      attention.dilated.head_layout,
      ForFlag("head_layout",
              ParseHeadLayout(absl::GetFlag(FLAGS_head_layout))));
  attention.causal = true;
  attention.window_left = absl::GetFlag(FLAGS_window_left);
  attention.window_right = absl::GetFlag(FLAGS_window_right);
  LC_ASSIGN_OR_RETURN(
      attention.softcap,
      PositiveFlagIfGiven("softcap", absl::GetFlag(FLAGS_softcap)));
  attention.dropout = absl::GetFlag(FLAGS_attention_dropout);
  LC_ASSIGN_OR_RETURN(
      attention.backend,
      ForFlag("attention_backend",
              ParseAttentionBackend(absl::GetFlag(FLAGS_attention_backend))));
  attention.deterministic = absl::GetFlag(FLAGS_deterministic);
  attention.ranks = absl::GetFlag(FLAGS_ranks);
  LC_ASSIGN_OR_RETURN(
      attention.layout,
      ForFlag("layout", ParseSequenceLayout(absl::GetFlag(FLAGS_layout))));
  if (attention.ranks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--ranks=", attention.ranks, " (expected >= 1 thread ranks)"));
  }

  DataOptions& data = options.data;
  LC_ASSIGN_OR_RETURN(
      data.task, ForFlag("task", ParseTaskType(absl::GetFlag(FLAGS_task))));
  data.context = model.context;
  data.seed = absl::GetFlag(FLAGS_seed);
  data.path = UserPath(absl::GetFlag(FLAGS_data));
  if (data.task != TaskType::kText && !data.path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--data=", absl::GetFlag(FLAGS_data),
                     " is only used with --task=text"));
  }
  data.max_distance = absl::GetFlag(FLAGS_distance);
  data.queries = absl::GetFlag(FLAGS_queries);
  data.num_keys = absl::GetFlag(FLAGS_keys);
  data.pairs = absl::GetFlag(FLAGS_pairs);
  if (absl::GetFlag(FLAGS_align) && data.task != TaskType::kText) {
    std::tie(data.position_stride, data.position_offset) =
        LongestPatternAlignment(model);
  }

  options.steps = absl::GetFlag(FLAGS_steps);
  options.batch = absl::GetFlag(FLAGS_batch);
  options.lr = absl::GetFlag(FLAGS_lr);
  options.min_lr = absl::GetFlag(FLAGS_min_lr);
  options.warmup = absl::GetFlag(FLAGS_warmup);
  options.adamw.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  options.clip = absl::GetFlag(FLAGS_clip);
  options.skip_nonfinite_steps = absl::GetFlag(FLAGS_skip_nonfinite_steps);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.threads = absl::GetFlag(FLAGS_threads);
  options.checkpoint_dir = UserPath(absl::GetFlag(FLAGS_checkpoint_dir));
  options.checkpoint_every = absl::GetFlag(FLAGS_checkpoint_every);
  options.resume = absl::GetFlag(FLAGS_resume);
  options.resume_from = UserPath(absl::GetFlag(FLAGS_resume_from));
  options.overwrite_checkpoints = absl::GetFlag(FLAGS_overwrite_checkpoints);
  options.stop_after = absl::GetFlag(FLAGS_stop_after);
  options.metrics_path = UserPath(absl::GetFlag(FLAGS_metrics));
  options.eval_every = absl::GetFlag(FLAGS_eval_every);
  options.eval_batches = absl::GetFlag(FLAGS_eval_batches);
  options.log_every = absl::GetFlag(FLAGS_log_every);
  options.progress = &std::cout;
  options.progress_in_place = isatty(fileno(stdout)) != 0;
  LC_RETURN_IF_ERROR(ValidateTrainOptions(options));
  return options;
}

absl::Status Run() {
  LC_ASSIGN_OR_RETURN(const TrainOptions options, OptionsFromFlags());
  LC_ASSIGN_OR_RETURN(const TrainResult result, Train(options));
  if (!result.evals.empty()) {
    const EvalResult& last = result.evals.back();
    if (options.data.task == TaskType::kText) {
      std::cout << absl::StrFormat(
          "done in %.1f s: final held-out loss %.3f bits/byte\n",
          result.seconds, last.loss / std::log(2.0));
    } else {
      std::cout << absl::StrFormat(
          "done in %.1f s: final accuracy %.1f%% vs chance %.1f%% (%d answers "
          "at distances up to %d)\n",
          result.seconds, 100 * last.accuracy, 100 * last.chance, last.answers,
          last.buckets.empty() ? 0 : last.buckets.back().max_distance);
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace lc

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Trains a long-context byte-level transformer on the CPU or a GPU.\n"
      "Usage: bazel run //train -- [flags]; with no flags: passkey retrieval "
      "at context 4096 in a few minutes.");
  return lc::RunTool("train", argc, argv, lc::Run);
}
