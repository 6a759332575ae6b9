// POSIX file helpers shared by the checkpoint writers: path joins, existence,
// mkdir -p, and atomic writes (temporary file, fsync, rename, fsync of the
// directory), so a crash never leaves a half-written file under the final
// name. std::filesystem is avoided on purpose: libtorch.so exports its own
// copies of some std::filesystem functions (remove_all, equivalent, ...) that
// the dynamic linker may bind instead of libstdc++'s, and those crash.
#pragma once

#include <unistd.h>

#include <functional>
#include <string>

namespace unswag::io {

// Owns a file descriptor so every early return (error) closes it.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

std::string join(const std::string& dir, const std::string& name);
bool exists(const std::string& path);
std::string errno_text();
// Creates `dir` and its missing parents; an error names the path that failed.
void make_dirs(const std::string& dir);
// Writes `size` bytes to `fd` (retrying short writes); `what` names the file in errors.
void write_all(int fd, const void* data, size_t size, const std::string& what);
// The directory part of `path` ("." when it has none).
std::string parent_dir(const std::string& path);
// fsyncs and closes `fd` (the temporary file `tmp`, written whole), renames it
// over `path`, then fsyncs the directory so the rename itself is durable. `fd`
// is closed in every case; on error `tmp` is removed and `path` is untouched.
// For files written as a stream; write_atomic wraps it for one callback.
void commit_temp_file(int fd, const std::string& tmp, const std::string& path);
// Calls write(fd) on "<path>.tmp.<pid>", then fsyncs and renames it over
// `path`. On any error the temporary file is removed and `path` is untouched.
void write_atomic(const std::string& path, const std::function<void(int fd)>& write);
void write_text_atomic(const std::string& path, const std::string& text);

}  // namespace unswag::io
