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

void write_atomic(const std::string& path, const std::function<void(int fd)>& write) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TORCH_CHECK(fd >= 0, "cannot create ", tmp, ": ", errno_text());
  try {
    write(fd);
    TORCH_CHECK(::fsync(fd) == 0, "fsync of ", tmp, " failed: ", errno_text());
    const int closed = ::close(fd);
    fd = -1;
    TORCH_CHECK(closed == 0, "closing ", tmp, " failed: ", errno_text());
    TORCH_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "renaming ", tmp, " to ", path, " failed: ", errno_text());
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; a failure here leaves a complete file, so
  // it is not an error.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

void write_text_atomic(const std::string& path, const std::string& text) {
  write_atomic(path, [&](int fd) { write_all(fd, text.data(), text.size(), path); });
}

}  // namespace unswag::io
