// Directory helpers for checkpoints (POSIX, not std::filesystem: see
// src/models/file_io.h for why): listing, recursive removal, copying a small
// file, and the atomic rename of a finished checkpoint directory.
#pragma once

#include <string>
#include <vector>

namespace unswag::train::fs {

bool is_dir(const std::string& path);
// Names in `dir` (no "." / ".."), sorted; empty when `dir` does not exist.
std::vector<std::string> list_dir(const std::string& dir);
// Removes `path` and everything under it; a missing path is not an error.
void remove_tree(const std::string& path);
// Copies a (small) regular file atomically (write_atomic).
void copy_file(const std::string& from, const std::string& to);
std::string read_file(const std::string& path);
// fsyncs `dir` itself, so renames inside it are durable.
void sync_dir(const std::string& dir);
// Renames the complete directory `tmp` to `final_path`. When `final_path`
// exists (the same step saved again), it is first renamed aside and removed
// after, so a complete copy exists under one of the names at every moment.
void commit_dir(const std::string& tmp, const std::string& final_path);
// The absolute form of `path` (realpath when it exists).
std::string absolute(const std::string& path);

}  // namespace unswag::train::fs
