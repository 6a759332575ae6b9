// POSIX file helpers for the shard writer and the corpus writer, on top of
// models/file_io.h (errno text, complete writes): an owning file descriptor,
// and the fsync + rename that makes a file written as a stream (which
// io::write_atomic's single callback cannot express) appear atomically.
#pragma once

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "models/file_io.h"

namespace unswag::data::detail {

using io::Fd;

// The directory part of `path` ("." when it has none).
inline std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

// fsyncs and closes `fd` (the temporary file `tmp`), renames it over `path`,
// then fsyncs the directory so the rename itself is durable. `fd` is closed in
// every case; on error `tmp` is removed and `path` is left as it was.
inline void commit_file(int fd, const std::string& tmp, const std::string& path) {
  const bool synced = ::fsync(fd) == 0;
  const std::string sync_error = synced ? "" : io::errno_text();
  const bool closed = ::close(fd) == 0;
  const std::string close_error = closed ? "" : io::errno_text();
  if (!synced || !closed || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string error = !synced ? "fsync: " + sync_error : !closed ? "close: " + close_error
                                                                         : "rename: " + io::errno_text();
    ::unlink(tmp.c_str());
    TORCH_CHECK(false, "data: writing ", path, " failed (", error, ")");
  }
  Fd dir_fd(::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.fd >= 0) ::fsync(dir_fd.fd);  // a failure here leaves a complete file: not an error
}

}  // namespace unswag::data::detail
