#include "core/files.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>

#include "absl/strings/str_cat.h"

namespace lc {

std::string FileTypeName(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

absl::Status WriteFileAtomically(absl::string_view what,
                                 const std::string& path,
                                 absl::Span<const absl::string_view> chunks) {
  // The rename would replace whatever `path` names: a device node such as
  // /dev/full (when root may write its directory), a FIFO or a directory.
  // Only a regular file, or a new path, is a target. (stat
  // follows a symbolic link, so a link to a device is refused as well.)
  struct stat target;
  if (stat(path.c_str(), &target) == 0 && !S_ISREG(target.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "writing ", what, " ", path, ": it is ", FileTypeName(target.st_mode),
        " (expected a regular file to replace, or a new path)"));
  }
  static std::atomic<uint64_t> counter{0};
  std::string temp_path;
  int fd;
  do {
    temp_path = absl::StrCat(path, ".tmp.", getpid(), ".", counter++);
    fd = open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  } while (fd < 0 && errno == EEXIST);
  if (fd < 0) {
    const int error = errno;
    return absl::ErrnoToStatus(
        error, absl::StrCat("writing ", what, " ", path,
                            ": cannot create temporary file ", temp_path));
  }
  std::FILE* file = fdopen(fd, "wb");
  if (file == nullptr) {
    const int error = errno;
    close(fd);
    unlink(temp_path.c_str());
    return absl::ErrnoToStatus(
        error, absl::StrCat("writing ", what, " ", path,
                            ": cannot open temporary file ", temp_path));
  }
  int error = 0;
  const char* step = "";
  auto fail = [&](const char* what) {
    if (error != 0) return;
    error = errno != 0 ? errno : EIO;
    step = what;
  };
  errno = 0;
  for (const absl::string_view chunk : chunks) {
    if (!chunk.empty() &&
        std::fwrite(chunk.data(), 1, chunk.size(), file) != chunk.size()) {
      fail("writing");
      break;
    }
  }
  if (error == 0 && std::fflush(file) != 0) fail("flushing");
  if (error == 0 && fsync(fileno(file)) != 0) fail("syncing");
  if (std::fclose(file) != 0) fail("closing");
  if (error == 0 && std::rename(temp_path.c_str(), path.c_str()) != 0) {
    fail("renaming");
  }
  if (error != 0) {
    unlink(temp_path.c_str());
    return absl::ErrnoToStatus(
        error, absl::StrCat("writing ", what, " ", path, ": ", step,
                            " temporary file ", temp_path));
  }
  // Make the rename itself durable: sync the directory that holds `path`.
  const size_t slash = path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int dir_fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    fsync(dir_fd);
    close(dir_fd);
  }
  return absl::OkStatus();
}

}  // namespace lc
