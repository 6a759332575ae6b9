// POSIX file helpers (src/models/file_io.h).
#include "models/file_io.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace unswag::io {

std::string errno_text() { return std::strerror(errno); }

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void make_dirs(const std::string& dir) {
  if (dir.empty() || exists(dir)) return;
  const size_t slash = dir.find_last_of('/', dir.size() > 1 ? dir.size() - 2 : 0);
  if (slash != std::string::npos && slash > 0) make_dirs(dir.substr(0, slash));
  TORCH_CHECK(::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST, "cannot create directory ", dir, ": ",
              errno_text());
}

void write_all(int fd, const void* data, size_t size, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    TORCH_CHECK(n > 0, "writing ", what, " failed: ", errno_text());
    p += n;
    size -= size_t(n);
  }
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

void commit_temp_file(int fd, const std::string& tmp, const std::string& path) {
  const bool synced = ::fsync(fd) == 0;
  const std::string sync_error = synced ? "" : errno_text();
  const bool closed = ::close(fd) == 0;
  const std::string close_error = closed ? "" : errno_text();
  if (!synced || !closed || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string error = !synced ? "fsync: " + sync_error : !closed ? "close: " + close_error
                                                                         : "rename: " + errno_text();
    ::unlink(tmp.c_str());
    TORCH_CHECK(false, "writing ", path, " failed (", error, ")");
  }
  // A failure to sync the directory leaves a complete file: not an error.
  Fd dir_fd(::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.fd >= 0) ::fsync(dir_fd.fd);
}

void write_atomic(const std::string& path, const std::function<void(int fd)>& write) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TORCH_CHECK(fd >= 0, "cannot create ", tmp, ": ", errno_text());
  try {
    write(fd);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  commit_temp_file(fd, tmp, path);
}

void write_text_atomic(const std::string& path, const std::string& text) {
  write_atomic(path, [&](int fd) { write_all(fd, text.data(), text.size(), path); });
}

}  // namespace unswag::io
