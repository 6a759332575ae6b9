// POSIX file helpers shared by the shard reader/writer, the corpus writer and
// the loader: errno text, an owning file descriptor, complete writes, and the
// fsync + rename that makes a written file appear atomically.
#pragma once

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace unswag::data::detail {

inline std::string errno_text() { return std::strerror(errno); }

// Owns a file descriptor so that every early return (error) closes it.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

inline void write_all(int fd, const void* data, size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    TORCH_CHECK(n > 0, "data: writing ", path, " failed: ", errno_text());
    p += n;
    size -= size_t(n);
  }
}

// fsyncs and closes `fd` (the temporary file `tmp`), renames it over `path`,
// then fsyncs the directory so the rename itself is durable. `fd` is closed in
// every case; on error `tmp` is removed and `path` is left as it was.
inline void commit_file(int fd, const std::string& tmp, const std::string& path) {
  const bool synced = ::fsync(fd) == 0;
  const std::string sync_error = synced ? "" : errno_text();
  const bool closed = ::close(fd) == 0;
  const std::string close_error = closed ? "" : errno_text();
  if (!synced || !closed || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string error = !synced ? "fsync: " + sync_error : !closed ? "close: " + close_error
                                                                         : "rename: " + errno_text();
    ::unlink(tmp.c_str());
    TORCH_CHECK(false, "data: writing ", path, " failed (", error, ")");
  }
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.fd >= 0) ::fsync(dir_fd.fd);  // a failure here leaves a complete file: not an error
}

}  // namespace unswag::data::detail
