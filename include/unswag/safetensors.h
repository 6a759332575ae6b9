// Reading and writing safetensors checkpoints (the Hugging Face format) from
// C++: a memory-mapped reader that validates the whole header before handing
// out any tensor, an atomic writer whose files the Python `safetensors`
// library reads, and a loader for sharded checkpoints (index.json).
//
// Errors are c10::Error (TORCH_CHECK), whose message names the file and what
// is wrong with it; nothing is ever loaded partially.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace unswag::safetensors {

// One header entry. `begin`/`end` are byte offsets into the data section.
struct TensorInfo {
  std::string name;
  std::string dtype;  // as spelled in the file: "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// The safetensors dtype name of a torch dtype ("F32" for at::kFloat), and back.
// Both throw for dtypes the format (or this reader) does not support.
std::string dtype_name(at::ScalarType type);
at::ScalarType scalar_type(const std::string& dtype);

class File {
 public:
  // Maps `path` read-only and validates the header: every entry, the dtypes,
  // the byte sizes, and that the tensors tile the data section exactly.
  static File open(const std::string& path);

  const std::string& path() const { return path_; }
  // In file order (ascending data offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;

  // A CPU tensor that views the mapping without copying; the tensor keeps the
  // mapping alive, so it stays valid after this File is gone. The mapping is
  // private copy-on-write: writing into the tensor never reaches the file (and
  // does not crash), but is seen by other views of the same tensor from this
  // File. Clone it if it must be independent. When the data is not aligned to
  // the element size (files from writers that do not pad the header), the
  // tensor is an aligned copy instead of a view.
  at::Tensor get(const std::string& name) const;

 private:
  struct Mapping;
  File() = default;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  uint64_t data_start_ = 0;  // file offset of the data section
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of `path`, copied into tensors that own their memory; with
// copy = false, views of the mapping (File::get) instead, which cost no memory
// until read (for a caller that copies them once into their final place).
std::map<std::string, at::Tensor> load(const std::string& path, bool copy = true);

// Writes `tensors` (moved to CPU, made contiguous) to `path`. Like the Python
// library, the data is ordered by element size (largest first) then by name,
// so every tensor is aligned to its element size, and the header is padded
// with spaces to a multiple of 8. The file is written to "<path>.tmp.<pid>",
// fsynced and renamed over `path`: on any error `path` is left as it was and
// the temporary file is removed.
void save(const std::map<std::string, at::Tensor>& tensors, const std::string& path,
          const std::map<std::string, std::string>& metadata = {});

// The tensors of a checkpoint directory: the shards listed in
// "model.safetensors.index.json" ({"weight_map": {tensor: file}}), or else the
// single file "model.safetensors". Every tensor of the weight map must be in
// its shard, and every tensor of a shard must be listed for that shard.
std::map<std::string, at::Tensor> load_sharded(const std::string& dir, bool copy = true);

}  // namespace unswag::safetensors
