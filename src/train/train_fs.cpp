// Directory helpers for checkpoints (see train_fs.h).
#include "train/train_fs.h"

#include <c10/util/Exception.h>
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "models/file_io.h"

namespace unswag::train::fs {

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

void remove_tree(const std::string& path) {
  if (!io::exists(path)) return;
  // Depth-first, so files go before their directories.
  const int rc = ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); },
                        16, FTW_DEPTH | FTW_PHYS);
  TORCH_CHECK(rc == 0, "cannot remove ", path, ": ", io::errno_text());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "cannot open ", path, ": ", io::errno_text());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void copy_file(const std::string& from, const std::string& to) {
  const std::string bytes = read_file(from);
  io::write_atomic(to, [&](int fd) { io::write_all(fd, bytes.data(), bytes.size(), to); });
}

void sync_dir(const std::string& dir) {
  io::Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY));
  TORCH_CHECK(fd.fd >= 0, "cannot open directory ", dir, ": ", io::errno_text());
  ::fsync(fd.fd);
}

void commit_dir(const std::string& tmp, const std::string& final_path) {
  sync_dir(tmp);
  std::string aside;
  if (io::exists(final_path)) {
    aside = final_path + ".old." + std::to_string(::getpid());
    remove_tree(aside);
    TORCH_CHECK(::rename(final_path.c_str(), aside.c_str()) == 0, "cannot rename ", final_path, " to ", aside, ": ",
                io::errno_text());
  }
  TORCH_CHECK(::rename(tmp.c_str(), final_path.c_str()) == 0, "cannot rename ", tmp, " to ", final_path, ": ",
              io::errno_text());
  sync_dir(io::parent_dir(final_path));
  if (!aside.empty()) remove_tree(aside);
}

std::string absolute(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) != nullptr) return buf;
  if (!path.empty() && path[0] == '/') return path;
  if (::getcwd(buf, sizeof buf) == nullptr) return path;
  return std::string(buf) + "/" + path;
}

}  // namespace unswag::train::fs
