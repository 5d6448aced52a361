// safetensors files (https://github.com/huggingface/safetensors format): an
// 8-byte little-endian header length, a JSON header mapping names to
// {dtype, shape, data_offsets} (plus optional "__metadata__" of strings), then
// the raw little-endian data. Interoperates with Python's safetensors/torch.
#ifndef LONGCTX_CORE_SAFETENSORS_H_
#define LONGCTX_CORE_SAFETENSORS_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace lc {

struct SafetensorsFile {
  std::map<std::string, Tensor> tensors;  // CPU tensors
  std::map<std::string, std::string> metadata;
};

// Writes `tensors` (any device/strides; copied to dense little-endian data)
// to `path`. The file is written to a temporary name in the same directory,
// flushed with fsync and renamed, so a crash never leaves a half-written file
// at `path`; on any error the temporary file is removed. An existing `path`
// that is not a regular file (a device such as /dev/full, a FIFO, a
// directory) is refused (FailedPrecondition) and left as it is.
absl::Status WriteSafetensors(
    const std::string& path, const std::map<std::string, Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Reads a file. A missing file is NotFound; a truncated or corrupt one
// (bad header length, invalid JSON, unknown dtype, offsets out of range or
// overlapping, shape not matching the byte count) is DataLoss with a
// message naming the file and the problem. A path that is not a regular
// file (a directory, a FIFO, a device) is FailedPrecondition, refused without
// waiting for a FIFO's writer.
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

}  // namespace lc

#endif  // LONGCTX_CORE_SAFETENSORS_H_
