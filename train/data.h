// Training data over the byte vocabulary (256 token ids): synthetic
// long-range tasks (passkey retrieval and associative recall, with the
// evidence a chosen distance before the query) and windows of any text file.
// Every batch is a pure function of (seed, split, batch index), so a resumed
// run sees exactly the batches an uninterrupted one would: the data position
// is just the index of the next batch.
//
// Targets. Synthetic tasks score only the answer positions (every other target
// is -100): the filler between evidence and query is random, so next-token
// targets there would add loss that no model can reduce and bury the one
// token per query that measures long-range retrieval; with answer-only
// targets every gradient step is about retrieval, which is what lets a small
// model learn the task in minutes on two CPU cores. Text files use every
// next-token target.
#ifndef LONGCTX_TRAIN_DATA_H_
#define LONGCTX_TRAIN_DATA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace lc {

enum class TaskType {
  // One key byte ('A'.. ) hidden in random lowercase filler; at each query
  // position (token '?') the target is the key.
  kPasskey,
  // `pairs` key-value pairs (key 'A'..'Z' followed by value '0'..'9') in
  // random filler; a query position holds a key and its target is that key's
  // value. Needs an induction circuit (a local head links each value to the
  // key before it, a long-range head matches the query against it), so it
  // learns more slowly than passkey.
  kRecall,
  // Random windows of a text file's bytes; targets are the next bytes.
  kText,
};

// "passkey", "recall" or "text"; InvalidArgument naming the text otherwise.
absl::StatusOr<TaskType> ParseTaskType(const std::string& name);
std::string TaskTypeName(TaskType type);

// Which stream a batch comes from: training batches and evaluation batches
// never coincide (text: evaluation windows come from the held-out tail).
enum class DataSplit { kTrain, kEval };

struct DataOptions {
  TaskType task = TaskType::kPasskey;
  int64_t context = 4096;  // tokens per sequence
  uint64_t seed = 0;

  // Synthetic tasks. Distances (query position - evidence position) are
  // drawn uniformly from [min_distance, max_distance]; 0 for max_distance
  // means as far as the context allows.
  int64_t min_distance = 1;
  int64_t max_distance = 0;
  int64_t queries = 16;   // answer positions per sequence
  int64_t num_keys = 16;  // passkey: distinct keys, chance = 1 / num_keys
  int64_t pairs = 4;      // recall: pairs per sequence (distinct keys)
  // Evidence and queries sit on positions t with t % position_stride ==
  // position_offset: the positions one dilated pattern (w, r, o) selects are
  // those with t % r == o (when r divides w), so with stride r and offset o
  // a single head of that pattern can read the evidence from the query.
  int64_t position_stride = 1;
  int64_t position_offset = 0;

  // Text: the file, a regular file read as bytes through a read-only memory
  // map (memory grows with the windows read, not with the file's size). The
  // last tenth is held out for evaluation when it holds at least one window
  // (context + 1 bytes); otherwise both splits draw from the whole file. The
  // file must not shrink while the source exists: a window past its new end
  // (or a disk error under the map) is a SIGBUS that kills the process, as
  // for any mapped file.
  std::string path;
};

// One scored position of a synthetic batch.
struct Answer {
  int64_t row = 0;       // sequence in the batch
  int64_t position = 0;  // query position (where the target is)
  int64_t distance = 0;  // query position - evidence position
};

struct Batch {
  Tensor tokens;                // int64 [batch, context]
  Tensor targets;               // int64 [batch, context]; -100 where not scored
  std::vector<Answer> answers;  // synthetic tasks: every scored position
};

class DataSource {
 public:
  virtual ~DataSource() = default;

  // Batch `index` of `split`: a pure function of (options, split, index,
  // batch_size). Throws lc::Error for batch_size < 1, and ResourceExhausted
  // naming the batch size and the context when the batch does not fit in
  // memory.
  virtual Batch MakeBatch(int64_t batch_size, int64_t index,
                          DataSplit split) const = 0;

  // Synthetic tasks: the accuracy of guessing (1 / number of possible
  // answers) and the largest distance a query can have; 0 for text.
  virtual double chance_accuracy() const = 0;
  virtual int64_t max_distance() const = 0;
  // One line for the log: the task and its parameters.
  virtual std::string Describe() const = 0;
};

// Checks the options and makes the source. Errors name the value and what
// was expected (distances that do not fit the context or the stride, counts
// out of range); for text, a missing file (NotFound), an unreadable one, one
// that is not a regular file (a directory, a FIFO, a device such as
// /dev/zero; refused without waiting for a FIFO's writer), an empty one, or
// one shorter than a window (context + 1 bytes), each naming the path and the
// sizes.
absl::StatusOr<std::unique_ptr<DataSource>> CreateDataSource(
    const DataOptions& options);

}  // namespace lc

#endif  // LONGCTX_TRAIN_DATA_H_
