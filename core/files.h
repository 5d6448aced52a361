// Files the tools write and read: what a path is when a regular file was
// expected, and whole files written atomically (a temporary file beside the
// target, synced and renamed over it), so that a crash leaves the old file or
// the new one and never a device node replaced by a regular file.
#ifndef LONGCTX_CORE_FILES_H_
#define LONGCTX_CORE_FILES_H_

#include <sys/stat.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace lc {

// What a file of mode `mode` (stat's st_mode) is, for an error message that
// refuses it: "a directory", "a FIFO", "a character device", ...
std::string FileTypeName(mode_t mode);

// Writes the concatenation of `chunks` to a new temporary file next to
// `path` (<path>.tmp.<pid>.<n>), syncs it to disk and renames it to `path`,
// then syncs the directory. An existing `path` that is not a regular file (a
// device such as /dev/full, a FIFO, a directory, or a link to one) is refused
// before anything is written. On failure the temporary file is removed and
// `path` is left as it was; the error names `what` ("safetensors file") and
// the path.
absl::Status WriteFileAtomically(absl::string_view what,
                                 const std::string& path,
                                 absl::Span<const absl::string_view> chunks);

}  // namespace lc

#endif  // LONGCTX_CORE_FILES_H_
